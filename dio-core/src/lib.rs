//! dio-core (being written).
