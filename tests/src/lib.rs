//! Shared helpers for the integration and hardware-in-loop suites.
