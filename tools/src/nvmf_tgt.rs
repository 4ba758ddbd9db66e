//! `nvmf_tgt`: serves the namespaces of Dioxide controllers to NVMe/TCP hosts (the Linux
//! kernel's `nvme-tcp` among them), like SPDK's `nvmf_tgt`.
//!
//! Each backing controller (`-r`, as in `perf`; default the built-in emulated controller, so
//! it runs anywhere) becomes one NVM subsystem serving all its namespaces through
//! [`dioxide::NvmfFileBackend`]. The connections run inside Dioxide's pinned pollers (`-m`),
//! one poll group per poller, spread round-robin ([`dioxide::NvmfServing`]). At start the tool
//! prints the `nvme discover` / `nvme connect` lines and the `/dev/nvme-fabrics` line for hosts
//! without nvme-cli; SIGINT or SIGTERM closes every connection, shuts the controllers down and
//! exits 0.

use crate::cli::{CliError, EmulatedArgs, EmulatedShape, Parsed, clap_result, parse_capacity};
use crate::device::{self, Opened};
use crate::trid::{Target, TransportId};
use clap::Parser;
use dioxide::{
    Dioxide, InterruptMode, NvmfFileBackend, NvmfServing, NvmfSubsystem, NvmfTarget,
    NvmfTargetOptions,
};
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// The subsystem NQN when `--nqn` is not given.
pub const DEFAULT_NQN: &str = "nqn.2026-12.io.dioxide:nvmf-tgt";

/// `nvmf_tgt`'s command line, as clap sees it (values unchecked).
#[derive(Debug, Parser)]
#[command(
    name = "nvmf_tgt",
    about = "Dioxide nvmf_tgt - serve NVMe namespaces over NVMe/TCP",
    disable_version_flag = true,
    after_help = "Without -r, nvmf_tgt serves the built-in emulated NVMe controller (memory-backed).\n\
Example: nvmf_tgt -r 'trtype:PCIe traddr:0000:01:00.0' -m 0x3 --listen 192.168.1.10:4420 --allow-remote --allow-host nqn.2014-08.org.nvmexpress:uuid:..."
)]
pub struct TgtArgs {
    /// Transport ID of a backing controller: 'trtype:PCIe traddr:0000:04:00.0' or
    /// trtype:emulated; repeatable (one subsystem each)
    #[arg(short = 'r', long = "transport", value_name = "FMT")]
    pub transport: Vec<String>,
    /// Address and port to listen on. Default: 127.0.0.1:4420
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Allow a --listen or --discovery address that is not loopback
    #[arg(long = "allow-remote")]
    pub allow_remote: bool,
    /// A second listener for discovery only (e.g. 127.0.0.1:8009); the main listener
    /// answers discovery too
    #[arg(long, value_name = "ADDR:PORT")]
    pub discovery: Option<String>,
    /// Subsystem NQN (of the first controller; the others get .1, .2, ...). Default:
    /// nqn.2026-12.io.dioxide:nvmf-tgt
    #[arg(long, value_name = "NQN")]
    pub nqn: Option<String>,
    /// Host NQN allowed to connect; repeatable. Default: any host
    #[arg(long = "allow-host", value_name = "NQN")]
    pub allow_host: Vec<String>,
    /// Core mask of the pollers (hexadecimal 0x3, or a list [0,2-3]), one pinned poller per
    /// core. Default: one poller, not pinned
    #[arg(short = 'm', long = "core-mask", value_name = "MASK")]
    pub core_mask: Option<String>,
    /// Queue depth a host may ask for, per queue (2 to 1024). Default: 128
    #[arg(long = "queue-depth", value_name = "N")]
    pub queue_depth: Option<String>,
    /// I/O queues per controller (1 to 1024). Default: 64
    #[arg(long = "max-io-queues", value_name = "N")]
    pub max_io_queues: Option<String>,
    /// In-capsule data of an I/O command (a multiple of 16, at most 1m). Default: 8k
    #[arg(long = "in-capsule", value_name = "BYTES")]
    pub in_capsule: Option<String>,
    /// Largest I/O (MDTS; a power of two, 4k to 16m). Default: 128k
    #[arg(long = "max-io-size", value_name = "BYTES")]
    pub max_io_size: Option<String>,
    /// Largest C2HData PDU (reads larger than this are split; a multiple of 4, at least 4k).
    /// Default: the max I/O size
    #[arg(long = "max-c2h-data", value_name = "BYTES")]
    pub max_c2h_data: Option<String>,
    /// Outstanding R2Ts per connection (1 to 1024). Default: 16
    #[arg(long = "max-r2t", value_name = "N")]
    pub max_r2t: Option<String>,
    /// Connections the target holds at most (one per queue; 1 to 65536). Default: 2048
    #[arg(long = "max-connections", value_name = "N")]
    pub max_connections: Option<String>,
    /// Connections one host address holds at most (1 to 65536; a Linux host opens one per
    /// queue, 65 per controller at the default --max-io-queues). Default: 512
    #[arg(long = "max-connections-per-host", value_name = "N")]
    pub max_connections_per_host: Option<String>,
    /// Milliseconds a new connection has to complete ICReq and Connect before it is closed
    /// (1 to 3600000). Default: 10000
    #[arg(long = "connect-timeout-ms", value_name = "MS")]
    pub connect_timeout_ms: Option<String>,
    /// Milliseconds a write's data may take after its R2T (or its last H2CData PDU) before
    /// the connection is ended with a C2HTermReq and its buffers freed (1 to 3600000).
    /// Default: 30000
    #[arg(long = "h2c-timeout-ms", value_name = "MS")]
    pub h2c_timeout_ms: Option<String>,
    /// DMA memory a PCIe controller is expected to pin (checked against the hugepage pool and
    /// the locked-memory limit at start; buffers grow on demand). Default: queue depth x max
    /// I/O size x 2 + 16m (48m)
    #[arg(long = "dma-size", value_name = "BYTES")]
    pub dma_size: Option<String>,
    /// How long an idle poller keeps polling before it sleeps, in microseconds. Default: 0
    /// (sleep after --poller-spin empty polls: the target leaves a shared core to its hosts)
    #[arg(long = "poller-idle-us", value_name = "US")]
    pub poller_idle_us: Option<String>,
    /// Empty polls an idle poller makes at least before it sleeps. Default: 4
    #[arg(long = "poller-spin", value_name = "N")]
    pub poller_spin: Option<String>,
    /// What a poller does while commands are on the device: `polled` (keeps polling: a core
    /// per poller), `interrupt` (sleeps in poll(2) on the queues' MSI-X eventfds and its
    /// sockets as soon as a round finds nothing) or `adaptive[:US]` (polls until US
    /// microseconds, default 20, went by without a completion, then sleeps). Default: polled
    #[arg(long = "interrupt-mode", value_name = "MODE")]
    pub interrupt_mode: Option<String>,
    /// Polls a connection leaves its socket unread after finding it empty, unless it sent
    /// something since or a sleep found the socket readable (0 to 1048576; 0: read every
    /// poll). Default: 0 (an empty recv also runs the kernel's pending network work, which
    /// hosts on the same CPU wait for)
    #[arg(long = "recv-skip-rounds", value_name = "N")]
    pub recv_skip_rounds: Option<String>,
    /// Empty polls a poller with commands on the device makes before each further empty poll
    /// yields the CPU (sched_yield) to the hosts and the kernel's work on a shared core
    /// (0 to 1048576; 0: every empty poll yields). Default: 32
    #[arg(long = "poller-io-yield", value_name = "N")]
    pub poller_io_yield: Option<String>,
    /// Scheduling of the target's threads: `normal`, `idle` (SCHED_IDLE: any other runnable
    /// thread of the CPU, a host's fio or the kernel's network work, preempts the pollers at
    /// once) or `nice:N` (-20 to 19). Default: normal
    #[arg(long = "sched", value_name = "POLICY")]
    pub sched: Option<String>,
    /// The built-in emulated controller's shape.
    #[command(flatten)]
    pub emulated: EmulatedArgs,
}

/// A checked `nvmf_tgt` configuration.
#[derive(Debug, Clone)]
pub struct TgtConfig {
    /// `-r`, in order; empty: the built-in emulated controller.
    pub trids: Vec<TransportId>,
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--discovery`.
    pub discovery: Option<SocketAddr>,
    /// `--nqn`.
    pub nqn: String,
    /// `--allow-host`; empty: any host.
    pub hosts: Vec<String>,
    /// `-m`; `None`: one unpinned poller.
    pub cores: Option<Vec<u32>>,
    /// The connection limits.
    pub opts: NvmfTargetOptions,
    /// DMA memory to pin per PCIe controller.
    pub dma_bytes: u64,
    /// `--poller-idle-us`.
    pub poller_idle: Duration,
    /// `--poller-spin`.
    pub poller_spin: u32,
    /// `--interrupt-mode`.
    pub interrupts: InterruptMode,
    /// `--poller-io-yield`.
    pub poller_io_yield: u32,
    /// `--sched`.
    pub sched: Sched,
    /// The emulated controller's shape.
    pub emulated: EmulatedShape,
}

/// `--sched`: how the target's threads are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sched {
    /// The default policy (SCHED_OTHER, nice 0).
    Normal,
    /// SCHED_IDLE: the pollers run only while nothing else on their CPU wants to.
    Idle,
    /// SCHED_OTHER with this nice value.
    Nice(i32),
}

/// `--sched`: `normal`, `idle` or `nice:N`.
fn sched(v: &str) -> Result<Sched, CliError> {
    match v {
        "normal" => Ok(Sched::Normal),
        "idle" => Ok(Sched::Idle),
        _ => match v.strip_prefix("nice:").map(str::parse::<i32>) {
            Some(Ok(n)) if (-20..=19).contains(&n) => Ok(Sched::Nice(n)),
            _ => err(format!(
                "--sched is normal, idle or nice:N (N from -20 to 19), not '{v}'"
            )),
        },
    }
}

/// Applies `--sched` to the calling thread; threads it starts afterwards (the pollers)
/// inherit it.
fn apply_sched(s: Sched) -> Result<(), String> {
    match s {
        Sched::Normal => Ok(()),
        Sched::Idle => {
            let p = libc::sched_param { sched_priority: 0 };
            // SAFETY: `p` is a valid sched_param for the call's duration; pid 0 is this
            // thread.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) } != 0 {
                return Err(format!(
                    "nvmf_tgt: cannot switch to SCHED_IDLE ({}); run without --sched idle",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(())
        }
        Sched::Nice(n) => {
            // SAFETY: plain system call on this thread (who 0), no memory passed.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) } != 0 {
                return Err(format!(
                    "nvmf_tgt: cannot set nice {n} ({}); a negative value needs CAP_SYS_NICE",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(())
        }
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, CliError> {
    Err(CliError(msg.into()))
}

/// `--interrupt-mode` when not given.
pub const DEFAULT_INTERRUPT_MODE: InterruptMode = InterruptMode::Polled;
/// `--poller-io-yield` when not given.
pub const DEFAULT_POLLER_IO_YIELD: u32 = 32;

/// `--interrupt-mode`: `polled`, `interrupt`, `adaptive` or `adaptive:US`.
fn interrupt_mode(m: &str) -> Result<InterruptMode, CliError> {
    match m.split_once(':') {
        None if m == "polled" => Ok(InterruptMode::Polled),
        None if m == "interrupt" => Ok(InterruptMode::Interrupt),
        None if m == "adaptive" => Ok(InterruptMode::ADAPTIVE),
        Some(("adaptive", us)) => match us.parse::<u64>() {
            Ok(us) if (1..=1_000_000).contains(&us) => {
                Ok(InterruptMode::Adaptive(Duration::from_micros(us)))
            }
            _ => err(format!(
                "--interrupt-mode adaptive:US takes 1 to 1000000 microseconds, not '{us}'"
            )),
        },
        _ => err(format!(
            "--interrupt-mode is polled, interrupt, adaptive or adaptive:US, not '{m}'"
        )),
    }
}

fn number(
    opt: &str,
    v: Option<&str>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, CliError> {
    let Some(v) = v else { return Ok(None) };
    match parse_capacity(v) {
        Some(n) if range.contains(&n) => Ok(Some(n)),
        _ => err(format!(
            "{opt} must be a number from {} to {}, not '{v}'",
            range.start(),
            range.end()
        )),
    }
}

fn address(opt: &str, v: &str, allow_remote: bool) -> Result<SocketAddr, CliError> {
    let a: SocketAddr = v.parse().map_err(|_| {
        CliError(format!(
            "{opt} must be ADDR:PORT (127.0.0.1:4420, [::1]:4420), not '{v}'"
        ))
    })?;
    if !a.ip().is_loopback() && !allow_remote {
        return err(format!(
            "{opt} {a} is not a loopback address: hosts on the network could connect; add --allow-remote (and --allow-host) to mean it"
        ));
    }
    Ok(a)
}

fn check_nqn(opt: &str, v: &str) -> Result<String, CliError> {
    if !v.starts_with("nqn.") || v.len() > 223 || v.chars().any(|c| c.is_control() || c == ',') {
        return err(format!(
            "{opt} must be an NQN (nqn.YYYY-MM.reverse.domain:name, at most 223 bytes, no comma), not '{v}'"
        ));
    }
    Ok(v.to_string())
}

/// Parses `nvmf_tgt`'s command line (`args[0]` is the program name).
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Parsed<TgtConfig>, CliError> {
    let a: TgtArgs = match clap_result(args)? {
        Parsed::Help(h) => return Ok(Parsed::Help(h)),
        Parsed::Run(a) => a,
    };
    let trids = crate::cli::trids(&a.transport)?;
    if let Some(t) = trids.iter().find(|t| t.nsid.is_some()) {
        return err(format!(
            "-r: nvmf_tgt serves every namespace of a controller; drop ns:{} from the transport ID",
            t.nsid.unwrap_or(0)
        ));
    }
    let uses_emulated = trids.is_empty() || trids.iter().any(|t| t.target == Target::Emulated);
    if a.emulated.given() && !uses_emulated {
        return err(
            "--emulated-* options apply to the emulated controller only (no -r, or -r trtype:emulated)",
        );
    }
    // Data must stay: the emulated namespaces are memory-backed unless asked otherwise.
    let emulated = a.emulated.shape(true)?;
    let listen = address(
        "--listen",
        a.listen.as_deref().unwrap_or("127.0.0.1:4420"),
        a.allow_remote,
    )?;
    let discovery = match a.discovery.as_deref() {
        None => None,
        Some(v) => Some(address("--discovery", v, a.allow_remote)?),
    };
    let nqn = check_nqn("--nqn", a.nqn.as_deref().unwrap_or(DEFAULT_NQN))?;
    let hosts = a
        .allow_host
        .iter()
        .map(|h| check_nqn("--allow-host", h))
        .collect::<Result<Vec<_>, _>>()?;
    let cores = match a.core_mask.as_deref() {
        None => None,
        Some(m) => Some(crate::cli::parse_core_mask_of("-m (--core-mask)", m)?),
    };
    let d = NvmfTargetOptions::default();
    let queue_depth = number("--queue-depth", a.queue_depth.as_deref(), 2..=1024)?
        .map_or(d.max_queue_depth, |n| n as u16);
    let max_io_queues = number("--max-io-queues", a.max_io_queues.as_deref(), 1..=1024)?
        .map_or(d.max_io_queues, |n| n as u16);
    let in_capsule = match number("--in-capsule", a.in_capsule.as_deref(), 0..=1 << 20)? {
        Some(n) if n % 16 != 0 => {
            return err(format!("--in-capsule must be a multiple of 16, not {n}"));
        }
        Some(n) => n as u32,
        None => d.in_capsule,
    };
    let max_io = match number("--max-io-size", a.max_io_size.as_deref(), 4096..=16 << 20)? {
        Some(n) if !n.is_power_of_two() => {
            return err(format!("--max-io-size must be a power of two, not {n}"));
        }
        Some(n) => n as u32,
        None => d.max_transfer,
    };
    let max_c2h = match number("--max-c2h-data", a.max_c2h_data.as_deref(), 4096..=16 << 20)? {
        Some(n) if n % 4 != 0 => {
            return err(format!("--max-c2h-data must be a multiple of 4, not {n}"));
        }
        Some(n) => n as u32,
        None => max_io,
    };
    let max_r2t = number("--max-r2t", a.max_r2t.as_deref(), 1..=1024)?
        .map_or(d.max_r2t_per_conn, |n| n as u16);
    let max_connections = number("--max-connections", a.max_connections.as_deref(), 1..=65536)?
        .map_or(d.max_connections, |n| n as usize);
    let max_connections_per_host = number(
        "--max-connections-per-host",
        a.max_connections_per_host.as_deref(),
        1..=65536,
    )?
    .map_or(d.max_connections_per_host, |n| n as usize);
    let connect_timeout = number(
        "--connect-timeout-ms",
        a.connect_timeout_ms.as_deref(),
        1..=3_600_000,
    )?
    .map_or(d.connect_timeout, Duration::from_millis);
    let h2c_data_timeout = number(
        "--h2c-timeout-ms",
        a.h2c_timeout_ms.as_deref(),
        1..=3_600_000,
    )?
    .map_or(d.h2c_data_timeout, Duration::from_millis);
    let recv_skip_rounds = number(
        "--recv-skip-rounds",
        a.recv_skip_rounds.as_deref(),
        0..=1 << 20,
    )?
    .map_or(d.recv_skip_rounds, |n| n as u32);
    let dma_bytes = number("--dma-size", a.dma_size.as_deref(), 4 << 20..=1 << 40)?
        .unwrap_or(queue_depth as u64 * max_io as u64 * 2 + (16 << 20));
    let poller_idle = number(
        "--poller-idle-us",
        a.poller_idle_us.as_deref(),
        0..=10_000_000,
    )?
    .map_or(Duration::ZERO, Duration::from_micros);
    let poller_spin =
        number("--poller-spin", a.poller_spin.as_deref(), 1..=10_000_000)?.map_or(4, |n| n as u32);
    let poller_io_yield = number(
        "--poller-io-yield",
        a.poller_io_yield.as_deref(),
        0..=1 << 20,
    )?
    .map_or(DEFAULT_POLLER_IO_YIELD, |n| n as u32);
    let sched = a.sched.as_deref().map_or(Ok(Sched::Normal), sched)?;
    let interrupts = match a.interrupt_mode.as_deref() {
        None => DEFAULT_INTERRUPT_MODE,
        Some(m) => interrupt_mode(m)?,
    };
    let opts = NvmfTargetOptions {
        max_queue_depth: queue_depth,
        max_io_queues,
        in_capsule,
        max_h2c_data: max_io,
        max_c2h_data: max_c2h,
        max_transfer: max_io,
        max_r2t_per_conn: max_r2t,
        max_connections,
        max_connections_per_host,
        connect_timeout,
        h2c_data_timeout,
        recv_skip_rounds,
        ..d
    };
    Ok(Parsed::Run(TgtConfig {
        trids,
        listen,
        discovery,
        nqn,
        hosts,
        cores,
        opts,
        dma_bytes,
        poller_idle,
        poller_spin,
        interrupts,
        poller_io_yield,
        sched,
        emulated,
    }))
}

/// The NQN of subsystem `i` (controller `i`): `--nqn` for the first, `NQN.i` for the others.
pub fn subsystem_nqn(base: &str, i: usize) -> String {
    if i == 0 {
        base.to_string()
    } else {
        format!("{base}.{i}")
    }
}

/// The lines a host runs to reach subsystem `nqn` on `addr`: `nvme discover`, `nvme connect`
/// and, for hosts without nvme-cli, the line to write to `/dev/nvme-fabrics`.
pub fn connect_lines(addr: SocketAddr, nqn: &str, hostnqn: Option<&str>) -> Vec<String> {
    let ip = addr.ip().to_string();
    let port = addr.port();
    let host_opt = hostnqn.map_or(String::new(), |h| format!(" --hostnqn={h}"));
    let host_kv = hostnqn.map_or(String::new(), |h| format!(",hostnqn={h}"));
    vec![
        format!("nvme discover -t tcp -a {ip} -s {port}{host_opt}"),
        format!("nvme connect -t tcp -a {ip} -s {port} -n {nqn}{host_opt}"),
        format!(
            "echo 'transport=tcp,traddr={ip},trsvcid={port},nqn={nqn}{host_kv}' > /dev/nvme-fabrics"
        ),
    ]
}

/// SIGINT and SIGTERM, blocked in the calling thread (and the threads it starts later), to be
/// taken with [`wait_signal`].
fn block_signals() -> Result<libc::sigset_t, String> {
    // SAFETY: `sigset_t` is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t; these calls only write it (valid signal numbers).
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    // SAFETY: `set` is initialised; the old mask is not asked for (null).
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!(
            "nvmf_tgt: cannot block SIGINT/SIGTERM: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    // A shell starts a background job with SIGINT ignored, and an ignored signal is discarded
    // rather than left pending for sigwait: take the default action back (harmless while the
    // signals are blocked).
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: SIG_DFL for a valid signal number; no handler code is installed.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    Ok(set)
}

/// Waits for a signal of `set` (blocked by [`block_signals`]); returns its name.
fn wait_signal(set: &libc::sigset_t) -> &'static str {
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is an initialised sigset_t and `sig` a live int the call writes.
        let rc = unsafe { libc::sigwait(set, &mut sig) };
        if rc == 0 {
            return if sig == libc::SIGTERM {
                "SIGTERM"
            } else {
                "SIGINT"
            };
        }
    }
}

fn open(cfg: &TgtConfig) -> Result<Vec<Opened>, String> {
    let list: Vec<Target> = if cfg.trids.is_empty() {
        vec![Target::Emulated]
    } else {
        cfg.trids.iter().map(|t| t.target).collect()
    };
    list.iter()
        .map(|t| match t {
            Target::Emulated => device::open_emulated(&cfg.emulated),
            Target::Pcie(a) => device::open_pcie(&a.to_string(), cfg.dma_bytes),
            Target::Tcp(a) => Err(format!(
                "-r trtype:TCP ({a}) names a remote controller; nvmf_tgt serves local ones (trtype:PCIe or emulated)"
            )),
        })
        .collect()
}

/// Runs the target until SIGINT or SIGTERM.
pub fn run(cfg: &TgtConfig) -> Result<bool, String> {
    let signals = block_signals()?;
    let opened = open(cfg)?;
    apply_sched(cfg.sched)?;
    let mut b = Dioxide::builder();
    for o in &opened {
        b = b.controller(o.ctrl.clone());
    }
    b = match &cfg.cores {
        None => b.pollers([None]),
        Some(c) => b.pollers(c.iter().map(|&c| Some(c as usize))),
    };
    let dx = b
        .poller_idle(cfg.poller_idle)
        .poller_spin(cfg.poller_spin)
        .poller_io_yield(cfg.poller_io_yield)
        .interrupt_mode(cfg.interrupts)
        .build()
        .map_err(|e| format!("nvmf_tgt: {e}"))?;
    let target = NvmfTarget::new(cfg.opts.clone());
    let mut nqns = Vec::new();
    for (i, o) in opened.iter().enumerate() {
        let backend =
            NvmfFileBackend::new(&dx, i).map_err(|e| format!("nvmf_tgt: {}: {e}", o.label))?;
        let ns = dioxide::NvmfBackend::namespaces(&backend);
        let nqn = subsystem_nqn(&cfg.nqn, i);
        let mut s = NvmfSubsystem::new(nqn.clone(), Arc::new(backend));
        for h in &cfg.hosts {
            s = s.allow_host(h.clone());
        }
        target.add_subsystem(s);
        let size: u64 = ns.iter().map(|n| n.blocks * n.block_size as u64).sum();
        println!(
            "nvmf_tgt: subsystem {nqn}: {}, {} namespace(s), {}",
            o.label,
            ns.len(),
            crate::cli::human_bytes(size)
        );
        if ns.is_empty() {
            println!(
                "nvmf_tgt: WARNING: {} has no namespace Dioxide can serve",
                o.label
            );
        }
        nqns.push(nqn);
    }
    let listener = TcpListener::bind(cfg.listen)
        .map_err(|e| format!("nvmf_tgt: cannot listen on {}: {e}", cfg.listen))?;
    let serving =
        NvmfServing::start(&target, &dx, listener).map_err(|e| format!("nvmf_tgt: {e}"))?;
    let addr = serving.local_addr();
    let discovery = match cfg.discovery {
        None => None,
        Some(d) => {
            let l = TcpListener::bind(d)
                .map_err(|e| format!("nvmf_tgt: cannot listen on {d} for discovery: {e}"))?;
            // The discovery log page sends hosts to the main listener.
            target.advertise(addr);
            Some(NvmfServing::start(&target, &dx, l).map_err(|e| format!("nvmf_tgt: {e}"))?)
        }
    };
    let pollers = dx.poller_stats().len();
    println!(
        "nvmf_tgt: listening on {addr} (NVMe/TCP), {pollers} poller(s){}",
        match &cfg.cores {
            Some(c) => format!(" on cores {c:?}"),
            None => " (not pinned)".into(),
        }
    );
    if let Some(d) = &discovery {
        println!("nvmf_tgt: discovery on {}", d.local_addr());
    }
    println!(
        "nvmf_tgt: hosts allowed: {}",
        if cfg.hosts.is_empty() {
            "any".to_string()
        } else {
            cfg.hosts.join(", ")
        }
    );
    println!(
        "nvmf_tgt: limits per queue: depth {}, in-capsule {} B, max I/O {} B, {} R2Ts; {} I/O queues per controller",
        cfg.opts.max_queue_depth,
        cfg.opts.in_capsule,
        cfg.opts.max_transfer,
        cfg.opts.max_r2t_per_conn,
        cfg.opts.max_io_queues
    );
    let host = cfg.hosts.first().map(String::as_str);
    for nqn in &nqns {
        for line in connect_lines(
            discovery.as_ref().map_or(addr, |d| d.local_addr()),
            nqn,
            host,
        )
        .into_iter()
        .take(1)
        {
            println!("  {line}");
        }
        for line in connect_lines(addr, nqn, host).into_iter().skip(1) {
            println!("  {line}");
        }
    }
    println!("nvmf_tgt: ready; SIGINT or SIGTERM stops it");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let sig = wait_signal(&signals);
    println!("nvmf_tgt: {sig}: disconnecting the hosts");
    let mut reports = serving.stop(&dx, Duration::from_secs(10));
    if let Some(d) = discovery {
        reports.extend(d.stop(&dx, Duration::from_secs(10)));
    }
    let pollers = dx.poller_stats();
    for r in &reports {
        let (sleeps, io_sleeps, yields) = pollers
            .get(r.poller)
            .map_or((0, 0, 0), |p| (p.parks, p.io_sleeps, p.io_yields));
        println!(
            "nvmf_tgt: poller {}: {} connection(s), {} command(s), {} error status(es), {} PDUs in, {} PDUs out; {} recv ({} empty), {} writev; {} sleeps idle, {} with I/O on the device, {} yields",
            r.poller,
            r.connections,
            r.stats.commands,
            r.stats.errors,
            r.stats.pdus_in,
            r.stats.pdus_out,
            r.stats.socket_reads,
            r.stats.empty_reads,
            r.stats.socket_writes,
            sleeps,
            io_sleeps,
            yields
        );
        if r.abandoned > 0 {
            println!(
                "nvmf_tgt: {} command(s) of poller {} still at the device after 10 s were abandoned",
                r.abandoned, r.poller
            );
        }
    }
    // The subsystems hold the files of the backends: gone before the pollers and their
    // queue pairs, then the controllers.
    drop(target);
    dx.shutdown();
    drop(opened);
    println!("nvmf_tgt: controllers shut down");
    Ok(true)
}

/// `nvmf_tgt`'s main: parse, run, exit code.
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    Parsed::run_main(parse(args), run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &str) -> Result<TgtConfig, String> {
        cfg_v(&args.split_whitespace().collect::<Vec<_>>())
    }

    fn cfg_v(args: &[&str]) -> Result<TgtConfig, String> {
        let argv =
            std::iter::once("nvmf_tgt".to_string()).chain(args.iter().map(|s| s.to_string()));
        match parse(argv) {
            Ok(Parsed::Run(c)) => Ok(c),
            Ok(Parsed::Help(_)) => Err("help".into()),
            Err(e) => Err(e.0),
        }
    }

    #[test]
    fn defaults() {
        let c = cfg("").unwrap();
        assert_eq!(c.listen, "127.0.0.1:4420".parse().unwrap());
        assert_eq!(c.nqn, DEFAULT_NQN);
        assert!(c.trids.is_empty() && c.hosts.is_empty() && c.cores.is_none());
        assert_eq!(c.opts.max_queue_depth, 128);
        assert_eq!(c.emulated.backing, crate::cli::Backing::Memory);
        assert_eq!(c.dma_bytes, 48 << 20);
        assert_eq!((c.poller_idle, c.poller_spin), (Duration::ZERO, 4));
        assert_eq!(
            (c.opts.max_connections, c.opts.max_connections_per_host),
            (2048, 512)
        );
        assert_eq!(c.opts.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.opts.h2c_data_timeout, Duration::from_secs(30));
        assert_eq!(c.opts.recv_skip_rounds, 0);
        assert_eq!(
            cfg("--recv-skip-rounds 16").unwrap().opts.recv_skip_rounds,
            16
        );
    }

    #[test]
    fn options() {
        let c = cfg("--listen 127.0.0.1:0 -m 0x3 --allow-host nqn.2014-08.org.a:h --allow-host nqn.x:y --queue-depth 64 --in-capsule 4096 --max-io-size 64k --max-c2h-data 8k --max-r2t 4 --nqn nqn.2026-12.io.t:s").unwrap();
        assert_eq!(c.cores, Some(vec![0, 1]));
        assert_eq!(c.hosts, ["nqn.2014-08.org.a:h", "nqn.x:y"]);
        assert_eq!(
            (
                c.opts.max_queue_depth,
                c.opts.in_capsule,
                c.opts.max_transfer,
                c.opts.max_r2t_per_conn
            ),
            (64, 4096, 65536, 4)
        );
        assert_eq!(c.opts.max_c2h_data, 8192);
        assert_eq!(c.nqn, "nqn.2026-12.io.t:s");
        let l = cfg(
            "--max-connections 16 --max-connections-per-host 4 --connect-timeout-ms 2500 \
             --h2c-timeout-ms 700",
        )
        .unwrap();
        assert_eq!(l.opts.h2c_data_timeout, Duration::from_millis(700));
        assert!(cfg("--h2c-timeout-ms 0").is_err());
        assert_eq!(
            (l.opts.max_connections, l.opts.max_connections_per_host),
            (16, 4)
        );
        assert_eq!(l.opts.connect_timeout, Duration::from_millis(2500));
        assert!(cfg("--max-connections 0").is_err());
        assert_eq!(cfg("").unwrap().interrupts, InterruptMode::Polled);
        for (arg, mode) in [
            ("polled", InterruptMode::Polled),
            ("interrupt", InterruptMode::Interrupt),
            ("adaptive", InterruptMode::ADAPTIVE),
            (
                "adaptive:150",
                InterruptMode::Adaptive(Duration::from_micros(150)),
            ),
        ] {
            let c = cfg(&format!("--interrupt-mode {arg}")).unwrap();
            assert_eq!(c.interrupts, mode, "{arg}");
        }
        for bad in ["sleepy", "adaptive:0", "adaptive:x", "interrupt:5"] {
            let e = cfg(&format!("--interrupt-mode {bad}")).unwrap_err();
            assert!(e.contains("--interrupt-mode"), "{e}");
        }
        let y = cfg("--poller-io-yield 0 --sched idle").unwrap();
        assert_eq!((y.poller_io_yield, y.sched), (0, Sched::Idle));
        let d = cfg("").unwrap();
        assert_eq!(
            (d.poller_io_yield, d.sched),
            (DEFAULT_POLLER_IO_YIELD, Sched::Normal)
        );
        assert_eq!(cfg("--sched nice:19").unwrap().sched, Sched::Nice(19));
        assert_eq!(cfg("--sched nice:-5").unwrap().sched, Sched::Nice(-5));
        for bad in ["fifo", "nice:20", "nice:x", "idle:1"] {
            let e = cfg(&format!("--sched {bad}")).unwrap_err();
            assert!(e.contains("--sched"), "{e}");
        }
        assert!(cfg("--poller-io-yield -1").is_err());
        let p = cfg("--poller-idle-us 50 --poller-spin 1000").unwrap();
        assert_eq!(
            (p.poller_idle, p.poller_spin),
            (Duration::from_micros(50), 1000)
        );
    }

    #[test]
    fn refusals_name_the_fix() {
        let e = cfg("--listen 0.0.0.0:4420").unwrap_err();
        assert!(e.contains("--allow-remote"), "{e}");
        assert!(cfg("--listen 0.0.0.0:4420 --allow-remote").is_ok());
        assert!(cfg("--listen 4420").unwrap_err().contains("ADDR:PORT"));
        assert!(cfg("--nqn foo").unwrap_err().contains("NQN"));
        assert!(
            cfg("--allow-host a,b")
                .unwrap_err()
                .contains("--allow-host")
        );
        assert!(cfg("-m 0x0").unwrap_err().contains("-m (--core-mask)"));
        assert!(
            cfg("--queue-depth 1")
                .unwrap_err()
                .contains("--queue-depth")
        );
        assert!(
            cfg("--in-capsule 100")
                .unwrap_err()
                .contains("multiple of 16")
        );
        assert!(
            cfg("--max-io-size 3000")
                .unwrap_err()
                .contains("--max-io-size")
        );
        assert!(
            cfg("--max-io-size 96k")
                .unwrap_err()
                .contains("power of two")
        );
        let e = cfg_v(&["-r", "trtype:emulated ns:1"])
            .map(|_| ())
            .unwrap_err();
        assert!(e.contains("drop ns:1"), "{e}");
        let e = cfg("-r 0000:01:00.0 --emulated-size 1m").unwrap_err();
        assert!(e.contains("emulated controller only"), "{e}");
    }

    #[test]
    fn the_connect_lines() {
        let l = connect_lines(
            "127.0.0.1:4420".parse().unwrap(),
            "nqn.a:b",
            Some("nqn.h:1"),
        );
        assert_eq!(
            l[0],
            "nvme discover -t tcp -a 127.0.0.1 -s 4420 --hostnqn=nqn.h:1"
        );
        assert_eq!(
            l[1],
            "nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.a:b --hostnqn=nqn.h:1"
        );
        assert_eq!(
            l[2],
            "echo 'transport=tcp,traddr=127.0.0.1,trsvcid=4420,nqn=nqn.a:b,hostnqn=nqn.h:1' > /dev/nvme-fabrics"
        );
        let l = connect_lines("127.0.0.1:4420".parse().unwrap(), "nqn.a:b", None);
        assert_eq!(l[1], "nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.a:b");
        assert_eq!(subsystem_nqn("nqn.a:b", 0), "nqn.a:b");
        assert_eq!(subsystem_nqn("nqn.a:b", 2), "nqn.a:b.2");
    }
}
