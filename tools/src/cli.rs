//! Command-line options: SPDK's names, meanings and error messages, plus ours.
//!
//! Options are taken by clap as strings and checked here, so that a bad value gets SPDK's
//! message (`missing -q (--io-depth) operand`) or a plain one-line reason, never a usage dump.
//! [`parse_perf`] and [`parse_identify`] return either the help text or a checked
//! configuration; every error is one line.

use crate::trid::{Target, TransportId};
use crate::workload::Workload;
use clap::{Args, Parser};
use std::path::PathBuf;
use std::time::Duration;

/// Why the command line was refused. Each message is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(msg.into()))
}

/// How the built-in emulated controller runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmuMode {
    /// Commands complete when the doorbell is rung, on the caller's thread (deterministic).
    Inline,
    /// The controller polls its queues on its own thread, like a device beside the driver.
    Threaded,
}

/// What backs the emulated namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Reads return zeroes, writes are dropped: measures the driver, not a memcpy.
    Null,
    /// Data is kept in memory (needed by `verify`).
    Memory,
}

/// When the SQ tail doorbell is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DoorbellMode {
    /// After every command (what SPDK measured at 2.89 M IOPS).
    PerCommand,
    /// Once per batch of submissions (the default; SPDK's 10.39 M IOPS).
    PerBatch,
}

/// The shape of the built-in emulated controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmulatedShape {
    /// Inline or threaded.
    pub mode: EmuMode,
    /// LBA size in bytes.
    pub block_size: u32,
    /// Number of namespaces.
    pub namespaces: u32,
    /// Size of each namespace in bytes.
    pub size_bytes: u64,
    /// Null or memory.
    pub backing: Backing,
    /// `--emulated-fail-lba START:COUNT`: I/Os touching these blocks of every namespace
    /// complete with Unrecovered Read Error.
    pub fail_lba: Option<(u64, u64)>,
    /// `--emulated-metadata NSID`: namespace NSID is formatted with 8 bytes of metadata per
    /// block (extended LBA), which Dioxide lists but refuses for I/O.
    #[serde(default)]
    pub metadata_ns: Option<u32>,
    /// `--emulated-io-queues N`: the controller grants at most N I/O queue pairs (default:
    /// the emulator's 64).
    #[serde(default)]
    pub io_queues: Option<u16>,
    /// `--emulated-fault KIND:N`: what happens to the controller after N I/O commands.
    #[serde(default)]
    pub fault: Option<EmulatedFault>,
}

/// What an `--emulated-fault` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// Controller fatal status (CSTS.CFS) at the next command, which is not executed.
    Cfs,
    /// An invalid completion entry before the real one of the next two commands: one for
    /// command id 0xFFFF, then one with the command's own id and another SQ's id.
    Garbage,
    /// Surprise removal at the next command (registers read all ones, nothing more completes).
    Remove,
}

impl FaultKind {
    /// The name `--emulated-fault` takes.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Cfs => "cfs",
            FaultKind::Garbage => "garbage",
            FaultKind::Remove => "remove",
        }
    }
    /// What it does, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            FaultKind::Cfs => "controller fatal status (CSTS.CFS)",
            FaultKind::Garbage => {
                "invalid completion entries (an unknown command id, a wrong SQ id)"
            }
            FaultKind::Remove => "surprise removal",
        }
    }
}

/// `--emulated-fault KIND:N`: the fault and the number of I/O commands executed before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EmulatedFault {
    /// What happens.
    pub kind: FaultKind,
    /// I/O commands (every queue) executed normally before it.
    pub after: u64,
}

impl std::fmt::Display for EmulatedFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} ({} after {} I/O commands)",
            self.kind.name(),
            self.after,
            self.kind.describe(),
            self.after
        )
    }
}

/// Bytes as the largest binary unit that divides them exactly: `1 TiB`, `256 MiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if b >= 1 << shift && b % (1 << shift) == 0 {
            return format!("{} {unit}", b >> shift);
        }
    }
    format!("{b} B")
}

impl EmulatedShape {
    /// `inline, null-backed 1 TiB namespace, 512 B blocks`.
    pub fn describe(&self) -> String {
        let mode = match self.mode {
            EmuMode::Inline => "inline",
            EmuMode::Threaded => "threaded",
        };
        let backing = match self.backing {
            Backing::Null => "null",
            Backing::Memory => "memory",
        };
        let ns = if self.namespaces == 1 {
            format!(
                "{backing}-backed {} namespace",
                human_bytes(self.size_bytes)
            )
        } else {
            format!(
                "{} {backing}-backed {} namespaces",
                self.namespaces,
                human_bytes(self.size_bytes)
            )
        };
        let md = match self.metadata_ns {
            Some(n) => format!(", namespace {n} with {}+8 B blocks", self.block_size),
            None => String::new(),
        };
        let q = match self.io_queues {
            Some(n) => format!(", {n} I/O queues"),
            None => String::new(),
        };
        let fault = match self.fault {
            Some(f) => format!(", fault {f}"),
            None => String::new(),
        };
        format!("{mode}, {ns}, {} B blocks{md}{q}{fault}", self.block_size)
    }

    /// Blocks per namespace.
    pub fn blocks(&self) -> u64 {
        self.size_bytes / self.block_size as u64
    }
}

/// Options choosing the built-in emulated controller's shape (both tools).
#[derive(Debug, Clone, Default, Args)]
pub struct EmulatedArgs {
    /// Emulated controller: inline (completes when the doorbell is rung) or threaded (its own
    /// thread). Default: inline.
    #[arg(long = "emulated-mode", value_name = "inline|threaded")]
    pub mode: Option<String>,
    /// Emulated LBA size in bytes: 512 or 4096. Default: 512.
    #[arg(long = "emulated-block-size", value_name = "BYTES")]
    pub block_size: Option<String>,
    /// Number of emulated namespaces. Default: 1.
    #[arg(long = "emulated-namespaces", value_name = "N")]
    pub namespaces: Option<String>,
    /// Size of each emulated namespace (k/m/g/t suffixes). Default: 1t when null-backed,
    /// 256m when memory-backed.
    #[arg(long = "emulated-size", value_name = "SIZE")]
    pub size: Option<String>,
    /// What backs the emulated namespaces: null or memory. Default: null, memory for
    /// `-w verify`.
    #[arg(long = "emulated-backing", value_name = "null|memory")]
    pub backing: Option<String>,
    /// Inject a media error: every I/O touching blocks START..START+COUNT of each emulated
    /// namespace completes with Unrecovered Read Error (to exercise -Q).
    #[arg(long = "emulated-fail-lba", value_name = "START:COUNT")]
    pub fail_lba: Option<String>,
    /// Format emulated namespace NSID with 8 bytes of metadata per block (extended LBA), to see
    /// how the tools treat a namespace Dioxide refuses for I/O.
    #[arg(long = "emulated-metadata", value_name = "NSID")]
    pub metadata_ns: Option<String>,
    /// The emulated controller grants at most N I/O queue pairs (1 to 4096; default 64), as a
    /// small controller does.
    #[arg(long = "emulated-io-queues", value_name = "N")]
    pub io_queues: Option<String>,
    /// Inject a fault after N I/O commands (to see how perf ends): cfs (controller fatal
    /// status), garbage (invalid completion entries before two real ones) or remove (surprise
    /// removal).
    #[arg(long = "emulated-fault", value_name = "cfs|garbage|remove:N")]
    pub fault: Option<String>,
}

impl EmulatedArgs {
    /// True if any `--emulated-*` option was given.
    pub fn given(&self) -> bool {
        self.mode.is_some()
            || self.block_size.is_some()
            || self.namespaces.is_some()
            || self.size.is_some()
            || self.backing.is_some()
            || self.fail_lba.is_some()
            || self.metadata_ns.is_some()
            || self.io_queues.is_some()
            || self.fault.is_some()
    }

    /// The shape, with `verify` choosing memory backing by default.
    pub fn shape(&self, verify: bool) -> Result<EmulatedShape, CliError> {
        let mode = match self.mode.as_deref() {
            None | Some("inline") => EmuMode::Inline,
            Some("threaded") => EmuMode::Threaded,
            Some(m) => {
                return err(format!(
                    "--emulated-mode must be inline or threaded, not '{m}'"
                ));
            }
        };
        let block_size = match self.block_size.as_deref() {
            None => 512,
            Some(s) => match parse_capacity(s) {
                Some(512) => 512,
                Some(4096) => 4096,
                _ => {
                    return err(format!(
                        "--emulated-block-size must be 512 or 4096, not '{s}'"
                    ));
                }
            },
        };
        let namespaces = match self.namespaces.as_deref() {
            None => 1,
            Some(s) => match s.parse::<u32>() {
                Ok(n @ 1..=1024) => n,
                _ => {
                    return err(format!(
                        "--emulated-namespaces must be 1 to 1024, not '{s}'"
                    ));
                }
            },
        };
        let backing = match self.backing.as_deref() {
            None if verify => Backing::Memory,
            None | Some("null") => Backing::Null,
            Some("memory") => Backing::Memory,
            Some(b) => {
                return err(format!(
                    "--emulated-backing must be null or memory, not '{b}'"
                ));
            }
        };
        let size_bytes = match self.size.as_deref() {
            None if backing == Backing::Null => 1 << 40,
            None => 256 << 20,
            Some(s) => match parse_capacity(s) {
                Some(n) if n >= block_size as u64 && n % block_size as u64 == 0 => n,
                _ => {
                    return err(format!(
                        "--emulated-size must be a non-zero multiple of the block size ({block_size}), not '{s}'"
                    ));
                }
            },
        };
        let fail_lba = match self.fail_lba.as_deref() {
            None => None,
            Some(v) => match v
                .split_once(':')
                .and_then(|(a, b)| Some((parse_capacity(a)?, parse_capacity(b)?)))
            {
                Some((start, count)) if count > 0 => Some((start, count)),
                _ => {
                    return err(format!(
                        "--emulated-fail-lba must be START:COUNT with COUNT > 0, not '{v}'"
                    ));
                }
            },
        };
        let metadata_ns = match self.metadata_ns.as_deref() {
            None => None,
            Some(s) => match s.parse::<u32>() {
                Ok(n) if n >= 1 && n <= namespaces => Some(n),
                _ => {
                    return err(format!(
                        "--emulated-metadata must be a namespace ID from 1 to {namespaces}, not '{s}'"
                    ));
                }
            },
        };
        let io_queues = match self.io_queues.as_deref() {
            None => None,
            Some(s) => match s.parse::<u16>() {
                Ok(n @ 1..=4096) => Some(n),
                _ => {
                    return err(format!("--emulated-io-queues must be 1 to 4096, not '{s}'"));
                }
            },
        };
        let fault = match self.fault.as_deref() {
            None => None,
            Some(v) => {
                let kind = match v.split_once(':') {
                    Some(("cfs", _)) => Some(FaultKind::Cfs),
                    Some(("garbage", _)) => Some(FaultKind::Garbage),
                    Some(("remove", _)) => Some(FaultKind::Remove),
                    _ => None,
                };
                let after = v.split_once(':').and_then(|(_, n)| n.parse::<u64>().ok());
                match (kind, after) {
                    (Some(kind), Some(after)) => Some(EmulatedFault { kind, after }),
                    _ => {
                        return err(format!(
                            "--emulated-fault must be cfs:N, garbage:N or remove:N (N: I/O commands before the fault), not '{v}'"
                        ));
                    }
                }
            }
        };
        Ok(EmulatedShape {
            fault,
            io_queues,
            fail_lba,
            metadata_ns,
            mode,
            block_size,
            namespaces,
            size_bytes,
            backing,
        })
    }
}

/// SPDK's `spdk_parse_capacity`: a decimal number with an optional binary suffix `k`, `m`,
/// `g` or `t` (either case, optionally followed by `B` or `iB`).
pub fn parse_capacity(s: &str) -> Option<u64> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return None;
    }
    let n: u64 = s[..digits].parse().ok()?;
    let rest = &s[digits..];
    let (shift, tail) = match rest.chars().next() {
        None => return Some(n),
        Some('k' | 'K') => (10, &rest[1..]),
        Some('m' | 'M') => (20, &rest[1..]),
        Some('g' | 'G') => (30, &rest[1..]),
        Some('t' | 'T') => (40, &rest[1..]),
        Some(_) => return None,
    };
    if !matches!(tail, "" | "B" | "b" | "iB") {
        return None;
    }
    n.checked_mul(1 << shift)
}

/// A `-c` core mask: hexadecimal (`0x3`, `3`) or a list (`[0,2-3]`). Sorted core numbers.
pub fn parse_core_mask(s: &str) -> Result<Vec<u32>, CliError> {
    parse_core_mask_of("-c (--core-mask)", s)
}

/// [`parse_core_mask`] for an option of another name (`opt` names it in the errors).
pub fn parse_core_mask_of(opt: &str, s: &str) -> Result<Vec<u32>, CliError> {
    let bad = || {
        CliError(format!(
            "{opt} '{s}' is not a core mask (e.g. 0x3 or [0,2-3])"
        ))
    };
    let mut cores = Vec::new();
    if let Some(list) = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
        for part in list.split(',') {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part.trim(), part.trim()),
            };
            let a: u32 = a.parse().map_err(|_| bad())?;
            let b: u32 = b.parse().map_err(|_| bad())?;
            if a > b || b >= 1024 {
                return Err(bad());
            }
            cores.extend(a..=b);
        }
    } else {
        let hex = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if hex.is_empty() || hex.len() > 256 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        for (i, c) in hex.chars().rev().enumerate() {
            let v = c.to_digit(16).expect("checked hex digit");
            for bit in 0..4 {
                if v & (1 << bit) != 0 {
                    cores.push(i as u32 * 4 + bit);
                }
            }
        }
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        return err(format!("{opt} '{s}' selects no core"));
    }
    Ok(cores)
}

/// `perf`'s command line, as clap sees it (values unchecked).
#[derive(Debug, Parser)]
#[command(
    name = "perf",
    about = "Dioxide perf - NVMe performance testing tool (spdk_nvme_perf's options and report)",
    long_about = None,
    disable_version_flag = true,
    after_help = "Without -r, perf runs on the built-in emulated NVMe controller and says so.\n\
Example: perf -r 'trtype:PCIe traddr:0000:01:00.0' -q 128 -o 4096 -w randread -t 10 -L"
)]
pub struct PerfArgs {
    /// io depth: I/Os in flight per namespace per core (required)
    #[arg(
        short = 'q',
        long = "io-depth",
        value_name = "VAL",
        allow_negative_numbers = true
    )]
    pub io_depth: Option<String>,
    /// io size in bytes, k/m/g suffixes; a multiple of the block size (required)
    #[arg(
        short = 'o',
        long = "io-size",
        value_name = "VAL",
        allow_negative_numbers = true
    )]
    pub io_size: Option<String>,
    /// io pattern: read, write, randread, randwrite, rw, randrw, or verify (required)
    #[arg(short = 'w', long = "io-pattern", value_name = "PATTERN")]
    pub io_pattern: Option<String>,
    /// rwmixread: read percentage for rw and randrw (100 for reads, 0 for writes)
    #[arg(
        short = 'M',
        long = "rwmixread",
        value_name = "0-100",
        allow_negative_numbers = true
    )]
    pub rwmixread: Option<String>,
    /// time in seconds (required; fractions allowed)
    #[arg(
        short = 't',
        long = "time",
        value_name = "SEC",
        allow_negative_numbers = true
    )]
    pub time: Option<String>,
    /// warmup time in seconds; statistics are reset after it
    #[arg(
        short = 'a',
        long = "warmup-time",
        value_name = "SEC",
        allow_negative_numbers = true
    )]
    pub warmup_time: Option<String>,
    /// core mask for I/O submission/completion, hex or [list] (default: 1)
    #[arg(short = 'c', long = "core-mask", value_name = "MASK")]
    pub core_mask: Option<String>,
    /// Transport ID: 'trtype:PCIe traddr:0000:04:00.0 [ns:N]' or trtype:emulated; repeatable
    #[arg(short = 'r', long = "transport", value_name = "FMT")]
    pub transport: Vec<String>,
    /// number of io queues per namespace (default: 1)
    #[arg(
        short = 'P',
        long = "num-qpairs",
        value_name = "VAL",
        allow_negative_numbers = true
    )]
    pub num_qpairs: Option<String>,
    /// size of the NVMe IO queues (default: maximum allowed by the controller)
    #[arg(long = "io-queue-size", value_name = "VAL")]
    pub io_queue_size: Option<String>,
    /// max completions per poll (default: 0 - unlimited)
    #[arg(
        short = 'C',
        long = "max-completion-per-poll",
        value_name = "VAL",
        allow_negative_numbers = true
    )]
    pub max_completions: Option<String>,
    /// number of I/Os to perform per thread on each namespace, then stop (default: 0 - unlimited)
    #[arg(
        short = 'd',
        long = "number-ios",
        value_name = "VAL",
        allow_negative_numbers = true
    )]
    pub number_ios: Option<String>,
    /// latency tracking: -L for a percentile summary, -LL for the full histogram
    #[arg(short = 'L', long = "enable-sw-latency-tracking", action = clap::ArgAction::Count)]
    pub latency: u8,
    /// do not stop on error; log I/O errors every N times
    #[arg(
        short = 'Q',
        long = "continue-on-error",
        value_name = "N",
        allow_negative_numbers = true
    )]
    pub continue_on_error: Option<String>,
    /// per-command timeout of the I/O queues in milliseconds: a command the device has not
    /// completed by then fails with a timeout (an Abort is sent, its buffer is never reused;
    /// with -Q the run goes on); 0 disables it (default: the driver's, 30000)
    #[arg(long = "io-timeout-ms", value_name = "MS")]
    pub io_timeout_ms: Option<String>,
    /// reset the controller once (Controller::reset, as SPDK's examples/nvme/reset does) after
    /// N I/Os have completed on it; the I/Os the reset fails are errors (-Q lets the run go
    /// on) and the queue pairs renew themselves (PCIe and emulated controllers)
    #[arg(long = "reset-after-ios", value_name = "N")]
    pub reset_after_ios: Option<String>,
    /// display core busy % (once a second on a terminal, and at the end) and the CPU time per
    /// I/O: perf's own (getrusage) and the whole system's (/proc/stat: the non-idle time of
    /// every CPU, the kernel's interrupt work included, but also any other program's, so it is
    /// honest only on an otherwise idle machine)
    #[arg(short = 'm', long = "cpu-usage")]
    pub cpu_usage: bool,
    /// enable the header digest of NVMe/TCP connections (trtype:TCP)
    #[arg(short = 'H', long = "enable-tcp-hdgst")]
    pub tcp_hdgst: bool,
    /// enable the data digest of NVMe/TCP connections (trtype:TCP)
    #[arg(short = 'I', long = "enable-tcp-ddgst")]
    pub tcp_ddgst: bool,
    /// for each namespace, submit I/Os from every core (default: spread namespaces over cores)
    #[arg(long = "use-every-core")]
    pub use_every_core: bool,
    /// print the results as JSON (schema in the json module) instead of the text report
    #[arg(long)]
    pub json: bool,
    /// write a latency percentile chart (SVG) to FILE
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// SQ doorbell: per-command or per-batch (default: per-batch)
    #[arg(long, value_name = "per-command|per-batch")]
    pub doorbell: Option<String>,
    /// write every doorbell to its register, even when the controller offers shadow doorbells
    /// (Doorbell Buffer Config)
    #[arg(long = "no-shadow-doorbells")]
    pub no_shadow_doorbells: bool,
    /// sleep on the queues' MSI-X interrupts instead of polling while waiting (PCIe and the
    /// emulated controller): `interrupt` (the default when given without a value: sleep as soon
    /// as a poll finds nothing), `adaptive` (after 20 µs without a completion), `adaptive:US`,
    /// or `polled` (the default)
    #[arg(long = "interrupt-mode", value_name = "MODE", num_args = 0..=1,
          default_missing_value = "interrupt")]
    pub interrupt_mode: Option<String>,
    /// write the CQ head doorbell once N completion entries were consumed (and earlier when the
    /// controller needs the room); 1: after every poll that found completions; default half
    /// the I/O queue
    #[arg(long = "cq-head-batch", value_name = "N")]
    pub cq_head_batch: Option<String>,
    /// seed for the random offsets (default: from the clock)
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// The built-in emulated controller's shape.
    #[command(flatten)]
    pub emulated: EmulatedArgs,
}

/// A checked `perf` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PerfConfig {
    /// `-q`: I/Os in flight per namespace per core.
    pub queue_depth: u32,
    /// `-o`: bytes per I/O.
    pub io_size: u64,
    /// `-w`.
    pub workload: Workload,
    /// `-M` for rw/randrw (`None` otherwise).
    pub rwmixread: Option<u8>,
    /// `-t` in seconds.
    pub time_secs: f64,
    /// `-a` in seconds (0: no warm-up).
    pub warmup_secs: f64,
    /// `-c` as core numbers.
    pub cores: Vec<u32>,
    /// `-r`, in order; empty: the built-in emulated controller.
    pub trids: Vec<TransportId>,
    /// `-P`.
    pub qpairs_per_ns: u32,
    /// `--io-queue-size` (`None`: the controller's maximum).
    pub io_queue_size: Option<u32>,
    /// `-C` (0: unlimited).
    pub max_completions: u32,
    /// `-d` (0: unlimited).
    pub number_ios: u64,
    /// `-L` count.
    pub latency_level: u8,
    /// `-Q N`: continue on error, report every Nth.
    pub continue_on_error: Option<u32>,
    /// `--io-timeout-ms` (`None`: the driver's default; `Some(None)`: no timeout).
    pub io_timeout: Option<Option<std::time::Duration>>,
    /// `--reset-after-ios`.
    pub reset_after_ios: Option<u64>,
    /// `-m`.
    pub cpu_usage: bool,
    /// `-H`, `-I`: header and data digests on NVMe/TCP connections.
    pub tcp_digests: (bool, bool),
    /// `--use-every-core`.
    pub use_every_core: bool,
    /// `--json`.
    pub json: bool,
    /// `--plot`.
    pub plot: Option<PathBuf>,
    /// `--doorbell`.
    pub doorbell: DoorbellMode,
    /// Shadow doorbells when the controller offers them (`--no-shadow-doorbells` turns them off).
    pub shadow_doorbells: bool,
    /// `--interrupt-mode`.
    pub interrupt: dioxide::InterruptMode,
    /// `--cq-head-batch` (0: the driver's default, half the queue).
    pub cq_head_batch: u16,
    /// `--seed`.
    pub seed: Option<u64>,
    /// The emulated controller's shape (used when no `-r` names a PCIe device).
    pub emulated: EmulatedShape,
    /// Warnings to print before the run (SPDK's, e.g. `-M` ignored).
    pub warnings: Vec<String>,
}

impl PerfConfig {
    /// Whether the run uses the emulated controller (no `-r`, or `-r trtype:emulated`).
    pub fn uses_emulated(&self) -> bool {
        self.trids.is_empty() || self.trids.iter().any(|t| t.target == Target::Emulated)
    }

    /// Whether a latency histogram must be kept (`-L`, `--json` or `--plot`).
    pub fn track_latency(&self) -> bool {
        self.latency_level > 0 || self.json || self.plot.is_some()
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Parsed<T> {
    /// `-h`/`--help`: print this and exit 0.
    Help(String),
    /// Run with this configuration.
    Run(T),
}

impl<T> Parsed<T> {
    /// A tool's `main` around parsing: help goes to stdout with exit 0, a parse error is one line
    /// on stderr with exit 1, and a configuration is handed to `run`, whose `Ok(false)` (the run
    /// itself found a failure, e.g. a verify mismatch) or error message also exit 1.
    pub fn run_main<E: std::fmt::Display>(
        parsed: Result<Parsed<T>, E>,
        run: impl FnOnce(&T) -> Result<bool, String>,
    ) -> std::process::ExitCode {
        use std::process::ExitCode;
        match parsed {
            Ok(Parsed::Help(h)) => {
                print!("{h}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
            Ok(Parsed::Run(cfg)) => match run(&cfg) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            },
        }
    }
}

/// clap's error as one line (its first), or the help text.
pub(crate) fn clap_result<T: Parser>(
    args: impl IntoIterator<Item = String>,
) -> Result<Parsed<T>, CliError> {
    match T::try_parse_from(args) {
        Ok(a) => Ok(Parsed::Run(a)),
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => {
            Ok(Parsed::Help(e.render().to_string()))
        }
        Err(e) => {
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments").trim();
            let line = line.strip_prefix("error: ").unwrap_or(line);
            err(format!("{line} (see --help)"))
        }
    }
}

fn int<T: std::str::FromStr>(opt: &str, v: &str) -> Result<T, CliError> {
    v.parse()
        .map_err(|_| CliError(format!("{opt}: '{v}' is not a valid number")))
}

fn secs(opt: &str, v: &str) -> Result<f64, CliError> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
        _ => err(format!("{opt}: '{v}' is not a number of seconds")),
    }
}

pub(crate) fn trids(list: &[String]) -> Result<Vec<TransportId>, CliError> {
    list.iter()
        .map(|r| {
            r.parse()
                .map_err(|e| CliError(format!("-r (--transport) '{r}': {e}")))
        })
        .collect()
}

/// Parses `perf`'s command line (`args[0]` is the program name).
pub fn parse_perf(args: impl IntoIterator<Item = String>) -> Result<Parsed<PerfConfig>, CliError> {
    let a: PerfArgs = match clap_result(args)? {
        Parsed::Help(h) => return Ok(Parsed::Help(h)),
        Parsed::Run(a) => a,
    };
    let mut warnings = Vec::new();

    let qpairs_per_ns = match a.num_qpairs.as_deref() {
        None => 1,
        Some(v) => match int::<u32>("-P (--num-qpairs)", v)? {
            0 => return err("-P (--num-qpairs) must be greater than 0"),
            n => n,
        },
    };
    let Some(q) = a.io_depth.as_deref() else {
        return err("missing -q (--io-depth) operand");
    };
    let queue_depth = match parse_capacity(q) {
        None => return err(format!("-q (--io-depth): '{q}' is not a valid number")),
        Some(0) => return err("-q (--io-depth) must be greater than 0"),
        Some(n) if n > 65535 => return err(format!("-q (--io-depth) {n} is more than 65535")),
        Some(n) => n as u32,
    };
    let Some(o) = a.io_size.as_deref() else {
        return err("missing -o (--io-size) operand");
    };
    let io_size = match parse_capacity(o) {
        None => return err(format!("-o (--io-size): '{o}' is not a valid size")),
        Some(0) => return err("-o (--io-size) must be greater than 0"),
        Some(n) if n > u32::MAX as u64 => {
            return err(format!("-o (--io-size) {n} is more than 4 GiB"));
        }
        Some(n) => n,
    };
    let Some(w) = a.io_pattern.as_deref() else {
        return err("missing -w (--io-pattern) operand");
    };
    let Some(t) = a.time.as_deref() else {
        return err("missing -t (--time) operand");
    };
    let time_secs = secs("-t (--time)", t)?;
    if time_secs == 0.0 {
        return err("-t (--time) must be greater than 0");
    }
    let continue_on_error = match a.continue_on_error.as_deref() {
        None => None,
        Some(v) => match int::<u32>("-Q (--continue-on-error)", v)? {
            0 => return err("-Q (--continue-on-error) value must be greater than 0"),
            n => Some(n),
        },
    };
    let io_timeout = match a.io_timeout_ms.as_deref() {
        None => None,
        Some(v) => match int::<u64>("--io-timeout-ms", v)? {
            0 => Some(None),
            ms => Some(Some(std::time::Duration::from_millis(ms))),
        },
    };
    let reset_after_ios = match a.reset_after_ios.as_deref() {
        None => None,
        Some(v) => match int::<u64>("--reset-after-ios", v)? {
            0 => return err("--reset-after-ios must be greater than 0"),
            n => Some(n),
        },
    };
    let workload: Workload = w.parse().map_err(|e| CliError(format!("{e}")))?;
    let mix = match a.rwmixread.as_deref() {
        None => None,
        Some(v) => match v.parse::<u8>() {
            Ok(m) if m <= 100 => Some(m),
            _ => {
                return err(format!(
                    "-M (--rwmixread) must be specified to value from 0 to 100, not '{v}'"
                ));
            }
        },
    };
    let rwmixread = if workload.needs_mix() {
        match mix {
            Some(m) => Some(m),
            None => {
                return err(
                    "-M (--rwmixread) must be specified to value from 0 to 100 for rw or randrw.",
                );
            }
        }
    } else {
        if mix.is_some() {
            warnings.push(
                "Ignoring -M (--rwmixread) option... Please use -M option only when using rw or randrw."
                    .to_string(),
            );
        }
        None
    };
    let warmup_secs = match a.warmup_time.as_deref() {
        None => 0.0,
        Some(v) => secs("-a (--warmup-time)", v)?,
    };
    let number_ios = match a.number_ios.as_deref() {
        None => 0,
        Some(v) => match parse_capacity(v) {
            Some(n) => n,
            None => return err(format!("-d (--number-ios): '{v}' is not a valid number")),
        },
    };
    if number_ios > 0 && warmup_secs > 0.0 {
        return err("-d (--number-ios) with -a (--warmup-time) is not supported");
    }
    if number_ios > 0 && number_ios < queue_depth as u64 {
        return err("-d (--number-ios) less than -q (--io-depth) is not supported");
    }
    let cores = parse_core_mask(a.core_mask.as_deref().unwrap_or("1"))?;
    let trids = trids(&a.transport)?;
    let io_queue_size = match a.io_queue_size.as_deref() {
        None => None,
        Some(v) => match parse_capacity(v) {
            Some(n @ 2..=65536) => Some(n as u32),
            _ => return err(format!("--io-queue-size must be 2 to 65536, not '{v}'")),
        },
    };
    let max_completions = match a.max_completions.as_deref() {
        None => 0,
        Some(v) => int("-C (--max-completion-per-poll)", v)?,
    };
    let doorbell = match a.doorbell.as_deref() {
        None | Some("per-batch") => DoorbellMode::PerBatch,
        Some("per-command") => DoorbellMode::PerCommand,
        Some(d) => {
            return err(format!(
                "--doorbell must be per-command or per-batch, not '{d}'"
            ));
        }
    };
    let interrupt = match a.interrupt_mode.as_deref() {
        None | Some("polled") => dioxide::InterruptMode::Polled,
        Some("interrupt") => dioxide::InterruptMode::Interrupt,
        Some("adaptive") => dioxide::InterruptMode::ADAPTIVE,
        Some(m) => match m.strip_prefix("adaptive:").map(str::parse::<u64>) {
            Some(Ok(us)) => dioxide::InterruptMode::Adaptive(Duration::from_micros(us)),
            _ => {
                return err(format!(
                    "--interrupt-mode must be polled, interrupt, adaptive or adaptive:MICROSECONDS, not '{m}'"
                ));
            }
        },
    };
    let cq_head_batch = match a.cq_head_batch.as_deref() {
        None => 0,
        Some(v) => match v.parse::<u16>() {
            Ok(n @ 1..) => n,
            _ => {
                return err(format!(
                    "--cq-head-batch must be 1 to 65535 (less than the I/O queue size), not '{v}'"
                ));
            }
        },
    };
    if reset_after_ios.is_some() && trids.iter().any(|t| matches!(t.target, Target::Tcp(_))) {
        return err("--reset-after-ios applies to PCIe and emulated controllers, not trtype:TCP");
    }
    if interrupt.sleeps() && trids.iter().any(|t| matches!(t.target, Target::Tcp(_))) {
        return err("--interrupt-mode applies to PCIe and emulated controllers, not trtype:TCP");
    }
    let emulated = a.emulated.shape(workload == Workload::Verify)?;
    if workload == Workload::Verify && emulated.backing == Backing::Null {
        warnings.push(
            "WARNING: -w verify on a null-backed emulated namespace: reads return no data, so every block will mismatch"
                .to_string(),
        );
    }
    let cfg = PerfConfig {
        queue_depth,
        io_size,
        workload,
        rwmixread,
        time_secs,
        warmup_secs,
        cores,
        trids,
        qpairs_per_ns,
        io_queue_size,
        max_completions,
        number_ios,
        latency_level: a.latency.min(2),
        continue_on_error,
        io_timeout,
        reset_after_ios,
        cpu_usage: a.cpu_usage,
        tcp_digests: (a.tcp_hdgst, a.tcp_ddgst),
        use_every_core: a.use_every_core,
        json: a.json,
        plot: a.plot,
        doorbell,
        shadow_doorbells: !a.no_shadow_doorbells,
        interrupt,
        cq_head_batch,
        seed: a.seed,
        emulated,
        warnings,
    };
    if a.emulated.given() && !cfg.uses_emulated() {
        return err(
            "--emulated-* options apply to the emulated controller only (no -r, or -r trtype:emulated)",
        );
    }
    Ok(Parsed::Run(cfg))
}

/// `identify`'s command line, as clap sees it.
#[derive(Debug, Parser)]
#[command(
    name = "identify",
    about = "Dioxide identify - print NVMe controller and namespace data (like spdk_nvme_identify)",
    disable_version_flag = true,
    after_help = "Without -r, identify reports the built-in emulated NVMe controller."
)]
pub struct IdentifyArgs {
    /// Transport ID: 'trtype:PCIe traddr:0000:04:00.0 [ns:N]' or trtype:emulated; repeatable
    #[arg(short = 'r', long = "transport", value_name = "FMT")]
    pub transport: Vec<String>,
    /// print the data as JSON
    #[arg(long)]
    pub json: bool,
    /// The built-in emulated controller's shape.
    #[command(flatten)]
    pub emulated: EmulatedArgs,
}

/// A checked `identify` configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentifyConfig {
    /// `-r`; empty: the built-in emulated controller.
    pub trids: Vec<TransportId>,
    /// `--json`.
    pub json: bool,
    /// The emulated controller's shape.
    pub emulated: EmulatedShape,
}

/// Parses `identify`'s command line (`args[0]` is the program name).
pub fn parse_identify(
    args: impl IntoIterator<Item = String>,
) -> Result<Parsed<IdentifyConfig>, CliError> {
    let a: IdentifyArgs = match clap_result(args)? {
        Parsed::Help(h) => return Ok(Parsed::Help(h)),
        Parsed::Run(a) => a,
    };
    let trids = trids(&a.transport)?;
    let emulated = a.emulated.shape(false)?;
    let uses_emulated = trids.is_empty() || trids.iter().any(|t| t.target == Target::Emulated);
    if a.emulated.given() && !uses_emulated {
        return err(
            "--emulated-* options apply to the emulated controller only (no -r, or -r trtype:emulated)",
        );
    }
    Ok(Parsed::Run(IdentifyConfig {
        trids,
        json: a.json,
        emulated,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trid::PciAddr;

    fn perf(args: &str) -> Result<PerfConfig, String> {
        let v =
            std::iter::once("perf".to_string()).chain(args.split_whitespace().map(String::from));
        match parse_perf(v) {
            Ok(Parsed::Run(c)) => Ok(c),
            Ok(Parsed::Help(_)) => Err("help".into()),
            Err(e) => Err(e.0),
        }
    }

    fn perf_err(args: &str) -> String {
        let e = perf(args).unwrap_err();
        assert!(!e.contains('\n'), "multi-line error: {e}");
        e
    }

    #[test]
    fn minimal_run_and_defaults() {
        let c = perf("-q 128 -o 4k -w randread -t 10").unwrap();
        assert_eq!(c.queue_depth, 128);
        assert_eq!(c.io_size, 4096);
        assert_eq!(c.workload, Workload::RandRead);
        assert_eq!(c.time_secs, 10.0);
        assert_eq!(c.cores, [0]);
        assert_eq!(c.qpairs_per_ns, 1);
        assert_eq!(c.rwmixread, None);
        assert_eq!(c.latency_level, 0);
        assert_eq!(c.doorbell, DoorbellMode::PerBatch);
        assert!(c.shadow_doorbells);
        assert!(c.uses_emulated());
        assert_eq!(
            c.emulated.describe(),
            "inline, null-backed 1 TiB namespace, 512 B blocks"
        );
        assert!(!c.track_latency());
    }

    #[test]
    fn every_option() {
        let c = perf(
            "-q 32 -o 1m -w randrw -M 70 -t 0.5 -a 1 -c 0x6 -P 2 --io-queue-size 256 -C 16 \
             -LL -Q 10 -m --use-every-core --json --plot out.svg --doorbell per-command --seed 9 \
             --no-shadow-doorbells -r trtype:emulated --emulated-mode threaded --emulated-block-size 4096 \
             --emulated-namespaces 3 --emulated-size 1g --emulated-backing memory",
        )
        .unwrap();
        assert_eq!(
            (c.queue_depth, c.io_size, c.rwmixread),
            (32, 1 << 20, Some(70))
        );
        assert_eq!((c.time_secs, c.warmup_secs), (0.5, 1.0));
        assert_eq!(c.cores, [1, 2]);
        assert_eq!(
            (c.qpairs_per_ns, c.io_queue_size, c.max_completions),
            (2, Some(256), 16)
        );
        assert_eq!((c.latency_level, c.continue_on_error), (2, Some(10)));
        assert!(c.cpu_usage && c.use_every_core && c.json && c.track_latency());
        assert!(!c.shadow_doorbells);
        assert_eq!(c.plot.as_deref(), Some(std::path::Path::new("out.svg")));
        assert_eq!((c.doorbell, c.seed), (DoorbellMode::PerCommand, Some(9)));
        assert_eq!(
            c.emulated.describe(),
            "threaded, 3 memory-backed 1 GiB namespaces, 4096 B blocks"
        );
        assert_eq!(c.emulated.blocks(), 1 << 18);
        // Long names too.
        let c = perf("--io-depth 1 --io-size 512 --io-pattern write --time 1 --number-ios 10 -L")
            .unwrap();
        assert_eq!((c.number_ios, c.latency_level), (10, 1));
    }

    #[test]
    fn transport_ids() {
        let c = perf(
            "-q 1 -o 4096 -w read -t 1 -r 0000:01:00.0 -r trtype:PCIe,traddr:0000:02:00.0,ns:2",
        )
        .unwrap();
        assert_eq!(c.trids.len(), 2);
        assert_eq!(c.trids[1].nsid, Some(2));
        assert_eq!(
            c.trids[1].target,
            Target::Pcie(PciAddr {
                domain: 0,
                bus: 2,
                dev: 0,
                func: 0
            })
        );
        assert!(!c.uses_emulated());
        assert_eq!(
            perf_err("-q 1 -o 4096 -w read -t 1 -r trtype:PCIe"),
            "-r (--transport) 'trtype:PCIe': trtype:PCIe needs traddr:<PCI address>, e.g. 'trtype:PCIe traddr:0000:01:00.0'"
        );
        assert!(
            perf_err("-q 1 -o 4096 -w read -t 1 -r traddr:0000:01:00.0,ns:0")
                .contains("not a namespace ID")
        );
        assert!(perf_err("-q 1 -o 4096 -w read -t 1 -r garbage").contains("has no ':' or '='"));
        assert!(
            perf_err("-q 1 -o 4096 -w read -t 1 -r 0000:01:00.0 --emulated-mode threaded")
                .contains("apply to the emulated controller only")
        );
    }

    #[test]
    fn missing_mandatory_options_spdk_messages() {
        assert_eq!(
            perf_err("-o 4096 -w read -t 1"),
            "missing -q (--io-depth) operand"
        );
        assert_eq!(
            perf_err("-q 1 -w read -t 1"),
            "missing -o (--io-size) operand"
        );
        assert_eq!(
            perf_err("-q 1 -o 4096 -t 1"),
            "missing -w (--io-pattern) operand"
        );
        assert_eq!(
            perf_err("-q 1 -o 4096 -w read"),
            "missing -t (--time) operand"
        );
    }

    #[test]
    fn io_timeout() {
        let t = |a: &str| {
            perf(&format!("-q 1 -o 4096 -w read -t 1 {a}"))
                .unwrap()
                .io_timeout
        };
        assert_eq!(t(""), None);
        assert_eq!(t("--io-timeout-ms 0"), Some(None));
        assert_eq!(
            t("--io-timeout-ms 1500"),
            Some(Some(std::time::Duration::from_millis(1500)))
        );
        assert_eq!(
            perf_err("-q 1 -o 4096 -w read -t 1 --io-timeout-ms x"),
            "--io-timeout-ms: 'x' is not a valid number"
        );
        assert_eq!(
            perf("-q 1 -o 4096 -w read -t 1 --reset-after-ios 500")
                .unwrap()
                .reset_after_ios,
            Some(500)
        );
        assert_eq!(
            perf_err("-q 1 -o 4096 -w read -t 1 --reset-after-ios 0"),
            "--reset-after-ios must be greater than 0"
        );
        // Any number of worker cores: the other cores' queue pairs hand their requests back
        // once the reset has stopped the device, and renew themselves after it.
        assert_eq!(
            perf("-q 1 -o 4096 -w read -t 1 -c 0x3 --reset-after-ios 500")
                .unwrap()
                .reset_after_ios,
            Some(500)
        );
    }

    #[test]
    fn bad_values() {
        assert_eq!(
            perf_err("-q 0 -o 4096 -w read -t 1"),
            "-q (--io-depth) must be greater than 0"
        );
        assert_eq!(
            perf_err("-q x -o 4096 -w read -t 1"),
            "-q (--io-depth): 'x' is not a valid number"
        );
        assert_eq!(
            perf_err("-q 1 -o 4x -w read -t 1"),
            "-o (--io-size): '4x' is not a valid size"
        );
        assert_eq!(
            perf_err("-q 1 -o 0 -w read -t 1"),
            "-o (--io-size) must be greater than 0"
        );
        assert_eq!(
            perf_err("-q 1 -o 512 -w read -t 0"),
            "-t (--time) must be greater than 0"
        );
        assert_eq!(
            perf_err("-q 1 -o 512 -w read -t -1"),
            "-t (--time): '-1' is not a number of seconds"
        );
        assert_eq!(
            perf_err("-q 1 -o 512 -w randomread -t 1"),
            "-w (--io-pattern) io pattern type must be one of (read, write, randread, randwrite, rw, randrw, verify), not 'randomread'"
        );
        assert_eq!(
            perf_err("-q 1 -o 512 -w rw -t 1"),
            "-M (--rwmixread) must be specified to value from 0 to 100 for rw or randrw."
        );
        assert_eq!(
            perf_err("-q 1 -o 512 -w randrw -t 1"),
            "-M (--rwmixread) must be specified to value from 0 to 100 for rw or randrw."
        );
        assert!(perf_err("-q 1 -o 512 -w randrw -M 101 -t 1").contains("from 0 to 100"));
        assert_eq!(
            perf_err("-q 1 -o 512 -w read -t 1 -P 0"),
            "-P (--num-qpairs) must be greater than 0"
        );
        assert_eq!(
            perf_err("-q 1 -o 512 -w read -t 1 -Q 0"),
            "-Q (--continue-on-error) value must be greater than 0"
        );
        assert_eq!(
            perf_err("-q 4 -o 512 -w read -t 1 -d 2"),
            "-d (--number-ios) less than -q (--io-depth) is not supported"
        );
        assert_eq!(
            perf_err("-q 4 -o 512 -w read -t 1 -d 20 -a 1"),
            "-d (--number-ios) with -a (--warmup-time) is not supported"
        );
        assert_eq!(
            perf_err("-q 1 -o 512 -w read -t 1 -c 0"),
            "-c (--core-mask) '0' selects no core"
        );
        assert!(perf_err("-q 1 -o 512 -w read -t 1 -c 0xg").contains("is not a core mask"));
        assert!(
            perf_err("-q 1 -o 512 -w read -t 1 --doorbell sometimes")
                .contains("per-command or per-batch")
        );
        assert!(
            perf_err("-q 1 -o 512 -w read -t 1 --emulated-block-size 1000").contains("512 or 4096")
        );
        assert!(
            perf_err("-q 1 -o 512 -w read -t 1 --emulated-size 1000")
                .contains("multiple of the block size")
        );
        let c = perf("-q 1 -o 512 -w verify -t 1 --emulated-backing null").unwrap();
        assert!(c.warnings[0].contains("every block will mismatch"));
        // clap's own errors are one line too.
        assert_eq!(
            perf_err("-q 1 -o 512 -w read -t 1 -x"),
            "unexpected argument '-x' found (see --help)"
        );
        assert_eq!(
            perf_err("-q"),
            "a value is required for '--io-depth <VAL>' but none was supplied (see --help)"
        );
    }

    #[test]
    fn m_ignored_for_read_write_with_spdk_warning() {
        let c = perf("-q 1 -o 512 -w read -M 50 -t 1").unwrap();
        assert_eq!(c.rwmixread, None);
        assert_eq!(
            c.warnings,
            [
                "Ignoring -M (--rwmixread) option... Please use -M option only when using rw or randrw."
            ]
        );
    }

    #[test]
    fn verify_defaults_to_memory() {
        let c = perf("-q 8 -o 4096 -w verify -t 1").unwrap();
        assert_eq!(c.emulated.backing, Backing::Memory);
        assert_eq!(
            c.emulated.describe(),
            "inline, memory-backed 256 MiB namespace, 512 B blocks"
        );
    }

    #[test]
    fn help_is_not_an_error() {
        assert!(matches!(perf("--help"), Err(h) if h == "help"));
        assert!(matches!(perf("-h"), Err(h) if h == "help"));
    }

    #[test]
    fn capacities_and_masks() {
        assert_eq!(parse_capacity("4096"), Some(4096));
        assert_eq!(parse_capacity("4k"), Some(4096));
        assert_eq!(parse_capacity("4KiB"), Some(4096));
        assert_eq!(parse_capacity("1T"), Some(1 << 40));
        assert_eq!(parse_capacity("2Mb"), Some(2 << 20));
        for bad in ["", "k", "4q", "4kk", "-1", "99999999999999999999t"] {
            assert_eq!(parse_capacity(bad), None, "{bad}");
        }
        assert_eq!(parse_core_mask("0x5").unwrap(), [0, 2]);
        assert_eq!(parse_core_mask("F0").unwrap(), [4, 5, 6, 7]);
        assert_eq!(parse_core_mask("[0,2-3]").unwrap(), [0, 2, 3]);
        assert!(parse_core_mask("[3-2]").is_err());
        assert_eq!(human_bytes(1 << 40), "1 TiB");
        assert_eq!(human_bytes(3 << 29), "1536 MiB");
        assert_eq!(human_bytes(1000), "1000 B");
    }

    #[test]
    fn identify_options() {
        let p = |s: &str| {
            parse_identify(
                std::iter::once("identify".to_string())
                    .chain(s.split_whitespace().map(String::from)),
            )
        };
        let Ok(Parsed::Run(c)) = p("--json -r 0000:01:00.0") else {
            panic!()
        };
        assert!(c.json);
        assert_eq!(c.trids.len(), 1);
        let Ok(Parsed::Run(c)) = p("--emulated-namespaces 2") else {
            panic!()
        };
        assert_eq!(c.emulated.namespaces, 2);
        assert!(p("-r nope").is_err());
    }
}
