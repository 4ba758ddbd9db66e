//! The Dioxide tools: `perf` (compatible with SPDK's `spdk_nvme_perf`), `identify` (like
//! `spdk_nvme_identify`) and `nvmf_tgt` (an NVMe/TCP target, like SPDK's `nvmf_tgt`).
//!
//! The binaries in `src/bin/` are thin: everything that can be tested without a device lives
//! here, one module per concern.
//!
//! - [`cli`]: command-line options with SPDK's names and error messages.
//! - [`trid`]: the transport ID syntax of `-r` (`'trtype:PCIe traddr:0000:01:00.0 ns:1'`).
//! - [`workload`]: the I/O pattern, read/write mix and offset generators (xorshift64, no `%`).
//! - [`clock`]: the tick source (TSC where it is invariant, else `CLOCK_MONOTONIC_RAW`).
//! - [`stats`]: per namespace per core counters and a latency histogram.
//! - [`report`]: SPDK's text report: the table, `-L` percentiles, `-LL` histogram, warnings.
//! - [`engine`]: the per-core worker loop (submit, ring once per batch, poll, resubmit).
//! - [`verify`]: the `verify` workload's self-identifying block pattern.
//! - [`json`]: the `--json` report, a documented schema.
//! - [`cpustat`]: the whole system's CPU time from `/proc/stat` (perf's CPU per I/O).
//! - [`plot`]: the `--plot FILE.svg` latency percentile chart.
//! - [`nvmf_tgt`]: the NVMe/TCP target's options, start-up lines and signal handling.
//! - [`ctxsw`]: thread vs process round trips over pipes (the cost of a change of address space).
//! - [`logger`]: prints the driver's `log` warnings and errors on stderr.
#![warn(missing_docs)]

pub mod cli;
pub mod clock;
pub mod counters;
pub mod cpustat;
pub mod ctxsw;
pub mod device;
pub mod engine;
pub mod identify;
pub mod json;
pub mod logger;
pub mod nvmf_tgt;
pub mod perf;
pub mod plot;
pub mod report;
pub mod stats;
pub mod trid;
pub mod verify;
pub mod workload;
