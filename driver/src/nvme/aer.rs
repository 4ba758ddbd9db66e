//! Asynchronous events: what a controller reports through the completion of an Asynchronous
//! Event Request (AER), decoded.
//!
//! From bring-up on, the driver keeps up to [`MAX_OUTSTANDING`] AERs outstanding on the admin
//! queue (limited by the controller's AERL), after enabling the SMART / health critical
//! warnings with Set Features / Asynchronous Event Configuration. When one completes, the event
//! is decoded ([`AsyncEvent::from_dw0`]), logged (`warn` for errors and health events, `info`
//! for notices), queued for the application (at most [`QUEUE_LIMIT`]; older events are dropped
//! with a warning), and the request is submitted again at once. The controller masks further
//! events of the same type until the host reads the log page the event names (Retain
//! Asynchronous Event clear), so taking the events with
//! [`Controller::async_events`](crate::Controller::async_events) reads those log pages: that
//! re-arms the event types. The admin queue is polled only by admin commands and by that call:
//! an application that wants its events calls it from time to time (the embedding API offers
//! the same as [`Dioxide::async_events`](crate::Dioxide::async_events)).

use core::fmt;

/// AERs kept outstanding at most (fewer when the controller's AERL is lower).
pub const MAX_OUTSTANDING: u16 = 4;
/// Events kept for the application at most; when it does not take them, the oldest go.
pub const QUEUE_LIMIT: usize = 64;
/// The Asynchronous Event Configuration asked for at bring-up: every SMART / health critical
/// warning (bits 7:0), which every controller accepts.
pub const CONFIG_SMART_WARNINGS: u32 = 0xff;

/// Asynchronous Event Type (completion dword 0, bits 2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AsyncEventType {
    /// Error status (a bad doorbell write, an internal or firmware error).
    Error,
    /// SMART / health status (reliability, temperature, spare).
    SmartHealth,
    /// Notice (namespace attributes changed, firmware activation, telemetry, ...).
    Notice,
    /// I/O command set specific status (reservations, sanitize).
    IoCommandSet,
    /// Vendor specific.
    Vendor,
    /// A type the specification reserves.
    Reserved(u8),
}

/// One asynchronous event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AsyncEvent {
    /// The event's type.
    pub kind: AsyncEventType,
    /// Asynchronous Event Information: what happened within the type (see
    /// [`description`](Self::description)).
    pub info: u8,
    /// The log page that tells more (reading it re-arms the event type).
    pub log_page: u8,
}

impl AsyncEvent {
    /// Decodes completion dword 0 of an Asynchronous Event Request.
    pub fn from_dw0(dw0: u32) -> AsyncEvent {
        let kind = match (dw0 & 7) as u8 {
            0 => AsyncEventType::Error,
            1 => AsyncEventType::SmartHealth,
            2 => AsyncEventType::Notice,
            6 => AsyncEventType::IoCommandSet,
            7 => AsyncEventType::Vendor,
            t => AsyncEventType::Reserved(t),
        };
        AsyncEvent {
            kind,
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }

    /// Completion dword 0 again.
    pub fn dw0(&self) -> u32 {
        let t = match self.kind {
            AsyncEventType::Error => 0,
            AsyncEventType::SmartHealth => 1,
            AsyncEventType::Notice => 2,
            AsyncEventType::IoCommandSet => 6,
            AsyncEventType::Vendor => 7,
            AsyncEventType::Reserved(t) => t as u32 & 7,
        };
        t | (self.info as u32) << 8 | (self.log_page as u32) << 16
    }

    /// True for the events an operator must see: errors and SMART / health warnings.
    pub fn is_warning(&self) -> bool {
        matches!(
            self.kind,
            AsyncEventType::Error | AsyncEventType::SmartHealth
        )
    }

    /// What the event means (NVMe 1.4, figures 146 to 149).
    pub fn description(&self) -> &'static str {
        use AsyncEventType::*;
        match (self.kind, self.info) {
            (Error, 0) => "write to an invalid doorbell register",
            (Error, 1) => "invalid doorbell write value",
            (Error, 2) => "diagnostic failure",
            (Error, 3) => "persistent internal error",
            (Error, 4) => "transient internal error",
            (Error, 5) => "firmware image load error",
            (Error, _) => "error (reserved information)",
            (SmartHealth, 0) => "NVM subsystem reliability degraded",
            (SmartHealth, 1) => "temperature threshold crossed",
            (SmartHealth, 2) => "available spare below threshold",
            (SmartHealth, _) => "SMART / health (reserved information)",
            (Notice, 0) => "namespace attribute changed",
            (Notice, 1) => "firmware activation starting",
            (Notice, 2) => "telemetry log changed",
            (Notice, 3) => "asymmetric namespace access change",
            (Notice, 4) => "predictable latency event aggregate log change",
            (Notice, 5) => "LBA status information alert",
            (Notice, 6) => "endurance group event aggregate log change",
            (Notice, _) => "notice (reserved information)",
            (IoCommandSet, 0) => "reservation log page available",
            (IoCommandSet, 1) => "sanitize operation completed",
            (IoCommandSet, 2) => "sanitize operation completed with unexpected deallocation",
            (IoCommandSet, _) => "I/O command set specific (reserved information)",
            (Vendor, _) => "vendor specific",
            (Reserved(_), _) => "reserved event type",
        }
    }
}

impl fmt::Display for AsyncEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} event: {} (information {:#04x}, log page {:#04x})",
            self.kind,
            self.description(),
            self.info,
            self.log_page
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_encodes_completion_dword0() {
        // QEMU's SMART temperature event: type 1, information 1, log page 2 (SMART).
        let e = AsyncEvent::from_dw0(0x0002_0101);
        assert_eq!(e.kind, AsyncEventType::SmartHealth);
        assert_eq!((e.info, e.log_page), (1, 2));
        assert_eq!(e.description(), "temperature threshold crossed");
        assert!(e.is_warning());
        assert_eq!(e.dw0(), 0x0002_0101);
        let n = AsyncEvent::from_dw0(0x0004_0002);
        assert_eq!(n.kind, AsyncEventType::Notice);
        assert!(!n.is_warning());
        assert_eq!(AsyncEvent::from_dw0(3).kind, AsyncEventType::Reserved(3));
        assert!(n.to_string().contains("namespace attribute changed"));
    }
}
