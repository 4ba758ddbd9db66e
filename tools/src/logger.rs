//! The binaries' logger: the driver logs through the `log` crate and never prints; `perf` and
//! `identify` print its warnings and errors on stderr, prefixed with the level and the module
//! (`dioxide: WARN dioxide::bus::vfio::memory: ...`). `DIOXIDE_LOG=debug` (or `info`, `trace`,
//! `off`) changes the level.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr;

impl Log for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("dioxide: {} {}: {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

/// The level named by `DIOXIDE_LOG`'s value, default warnings and errors.
pub fn level(var: Option<&str>) -> LevelFilter {
    match var.map(str::to_ascii_lowercase).as_deref() {
        Some("off") => LevelFilter::Off,
        Some("error") => LevelFilter::Error,
        Some("info") => LevelFilter::Info,
        Some("debug") => LevelFilter::Debug,
        Some("trace") => LevelFilter::Trace,
        _ => Level::Warn.to_level_filter(),
    }
}

/// Installs the stderr logger (once; later calls do nothing).
pub fn init() {
    static LOGGER: Stderr = Stderr;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level(std::env::var("DIOXIDE_LOG").ok().as_deref()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(level(None), LevelFilter::Warn);
        assert_eq!(level(Some("DEBUG")), LevelFilter::Debug);
        assert_eq!(level(Some("off")), LevelFilter::Off);
        assert_eq!(level(Some("nonsense")), LevelFilter::Warn);
    }
}
