//! `perf`'s program: open controllers, register namespaces, start one pinned worker per core,
//! print SPDK's report.

use crate::cli::{self, DoorbellMode, Parsed, PerfConfig};
use crate::clock::{Clock, Source};
use crate::counters::{self, PollCounters};
use crate::cpustat;
use crate::device::{self, Device, DriverBuf, DriverQueue};
use crate::engine::{self, Job, JobSpec, Progress, Settings, SharedQueue, VerifyStats};
use crate::json;
use crate::plot;
use crate::report::{self, Row};
use crate::stats::NsStats;
use crate::trid::{Target, TransportId};
use crate::workload::{Mix, Workload};
use dioxide::{ControllerOptions, Namespace, Nsid, QueueOptions};
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the cast is
        // how libc's signal() takes a handler address.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// The cores this process may run on.
pub fn allowed_cores() -> Vec<u32> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as u32)
        // SAFETY: `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i as usize, &set) })
        .collect()
}

/// Pins the calling thread to `core`.
pub fn pin_to(core: u32) -> std::io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` is below CPU_SETSIZE (checked by the caller against the allowed set).
    unsafe { libc::CPU_SET(core as usize, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One namespace registered for the test.
struct NsEntry {
    ctrl: usize,
    ns: Namespace,
    name: String,
}

/// A job's outcome, gathered from its worker.
struct Outcome {
    name: String,
    nsid: u32,
    core: u32,
    stats: NsStats,
    verify: VerifyStats,
    failure: Option<String>,
    /// I/Os never completed (on a queue that failed, or when the drain gave up).
    abandoned: u64,
    /// Completions for an I/O not in flight (double completions).
    doubles: u64,
    /// (qid, entries) of the job's queue pairs.
    queues: QueueList,
    /// The poll loop's counters, summed over the job's queue pairs.
    counters: PollCounters,
}

fn ranges(cores: &[u32], nss: usize, every_core: bool) -> Vec<(u32, usize)> {
    // SPDK's association: every namespace on every core with --use-every-core; otherwise
    // namespaces and cores paired round robin until both are used up.
    if every_core {
        return cores
            .iter()
            .flat_map(|&c| (0..nss).map(move |n| (c, n)))
            .collect();
    }
    let count = nss.max(cores.len());
    (0..count)
        .map(|i| (cores[i % cores.len()], i % nss))
        .collect()
}

fn human_out(cfg: &PerfConfig, s: &str) {
    // With --json, stdout is the JSON document only; the narrative goes to stderr.
    if cfg.json {
        eprint!("{s}");
    } else {
        print!("{s}");
    }
}

/// `perf`'s main: returns the exit code.
pub fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    Parsed::run_main(cli::parse_perf(args), run)
}

fn run(cfg: &PerfConfig) -> Result<bool, String> {
    for w in &cfg.warnings {
        eprintln!("{w}");
    }
    let allowed = allowed_cores();
    if let Some(c) = cfg.cores.iter().find(|c| !allowed.contains(c)) {
        return Err(format!(
            "-c (--core-mask): core {c} is not available to this process (available: {})",
            allowed
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    if cfg.trids.is_empty() {
        human_out(
            cfg,
            &format!(
                "Using the built-in emulated NVMe controller ({}): no device was named with -r\n",
                cfg.emulated.describe()
            ),
        );
    }
    human_out(cfg, "Initializing NVMe Controllers\n");

    // Open each controller once; remember which namespaces each -r asked for.
    let mut ctrls: Vec<Device> = Vec::new();
    let mut wanted: Vec<(usize, Option<u32>)> = Vec::new();
    let targets: Vec<TransportId> = if cfg.trids.is_empty() {
        vec![TransportId::of(Target::Emulated, None)]
    } else {
        cfg.trids.clone()
    };
    let mut keys: Vec<(Target, Option<&str>)> = Vec::new();
    let dma_bytes = cfg.io_size * cfg.queue_depth as u64 * cfg.cores.len() as u64 * 2 + (8 << 20);
    for trid in &targets {
        let key = (trid.target, trid.subnqn.as_deref());
        let idx = match keys.iter().position(|k| *k == key) {
            Some(i) => i,
            None => {
                let copts =
                    ControllerOptions::default().with_shadow_doorbells(cfg.shadow_doorbells);
                let opened =
                    device::open_with(trid, &cfg.emulated, dma_bytes, cfg.tcp_digests, &copts)?;
                if let Some(t) = opened.ctrl.tcp().filter(|t| t.is_discovery()) {
                    return Err(discovery_refused(&opened.label, t));
                }
                human_out(cfg, &opened.attached);
                keys.push(key);
                ctrls.push(opened);
                ctrls.len() - 1
            }
        };
        wanted.push((idx, trid.nsid));
    }

    // Register namespaces as SPDK's register_ns does.
    let mut warnings = Vec::new();
    let mut entries: Vec<NsEntry> = Vec::new();
    let mut skipped = false;
    for (ci, nsid) in wanted {
        let c = &ctrls[ci];
        let nss = match nsid {
            Some(n) => vec![c.ctrl.namespace(Nsid(n)).map_err(|e| e.to_string())?],
            None => c.ctrl.namespaces(),
        };
        let id = c.ctrl.identify();
        for ns in nss {
            if entries
                .iter()
                .any(|e| e.ctrl == ci && e.ns.nsid() == ns.nsid())
            {
                continue;
            }
            let n = ns.nsid().0;
            let bs = ns.block_size();
            if let Err(e) = ns.check_io() {
                let w = report::ns_refused_warning(&e);
                human_out(cfg, &w);
                warnings.push(w.trim_end().to_string());
                skipped = true;
                continue;
            }
            if ns.size_bytes() < cfg.io_size || bs as u64 > cfg.io_size {
                let w =
                    report::ns_size_warning(&id.mn, &id.sn, n, ns.size_bytes(), bs, cfg.io_size);
                human_out(cfg, &w);
                warnings.push(w.trim_end().to_string());
                skipped = true;
                continue;
            }
            let max_transfer = c.ctrl.max_transfer() as u64;
            let queue_size = queue_entries(cfg, c);
            if let Some(w) =
                report::queue_size_warning(cfg.queue_depth, cfg.io_size, max_transfer, queue_size)
            {
                human_out(cfg, &w);
                warnings.push(w.trim_end().replace('\n', " "));
            }
            if cfg.io_size % bs as u64 != 0 {
                let w = report::io_size_warning(cfg.io_size, n, bs);
                human_out(cfg, &w);
                warnings.push(w.trim_end().to_string());
                skipped = true;
                continue;
            }
            let name = format!("{} NSID {n}", c.label);
            entries.push(NsEntry { ctrl: ci, ns, name });
        }
    }
    if skipped {
        human_out(cfg, report::SKIPPED);
        warnings.push(report::SKIPPED.trim_end().to_string());
    }
    if entries.is_empty() {
        return Err("No valid namespaces to test (see the warnings above)".to_string());
    }

    let clock = Clock::new();
    let seed = cfg
        .seed
        .unwrap_or_else(|| crate::clock::monotonic_raw_ns() ^ std::process::id() as u64);
    let settings = Settings {
        queue_depth: cfg.queue_depth,
        workload: cfg.workload,
        mix: Mix::new(cfg.workload, cfg.rwmixread),
        time_ticks: clock.secs_to_ticks(cfg.time_secs),
        warmup_ticks: clock.secs_to_ticks(cfg.warmup_secs),
        number_ios: cfg.number_ios,
        max_completions: cfg.max_completions,
        doorbell_per_command: cfg.doorbell == DoorbellMode::PerCommand,
        continue_on_error: cfg.continue_on_error,
        track_latency: cfg.track_latency(),
        drain_timeout_ticks: clock.secs_to_ticks(60.0),
        sleep_after_ticks: match cfg.interrupt {
            dioxide::InterruptMode::Polled => None,
            dioxide::InterruptMode::Interrupt => Some(0),
            dioxide::InterruptMode::Adaptive(d) => Some(clock.secs_to_ticks(d.as_secs_f64())),
        },
    };

    // Associate namespaces with cores; for verify, split each namespace among its jobs.
    let pairs = ranges(&cfg.cores, entries.len(), cfg.use_every_core);
    let mut specs: Vec<(usize, JobSpec)> = Vec::new();
    for (i, &(core, e)) in pairs.iter().enumerate() {
        let ent = &entries[e];
        human_out(cfg, &report::associating(&ent.name, core));
        let io_blocks = (cfg.io_size / ent.ns.block_size() as u64) as u32;
        let size_in_ios = ent.ns.size_bytes() / cfg.io_size;
        let (first_io, ios) = if cfg.workload == Workload::Verify {
            let sharers = pairs.iter().filter(|p| p.1 == e).count() as u64;
            let index = pairs[..i].iter().filter(|p| p.1 == e).count() as u64;
            let per = size_in_ios / sharers;
            (index * per, per.max(1))
        } else {
            (0, size_in_ios)
        };
        let spec = JobSpec {
            name: ent.name.clone(),
            nsid: ent.ns.nsid().0,
            core,
            block_size: ent.ns.block_size(),
            io_blocks,
            first_io,
            ios,
            seed: seed.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        };
        specs.push((e, spec));
    }
    check_queue_budget(cfg, &ctrls, &entries, &specs)?;
    human_out(cfg, "Initialization complete. Launching workers.\n");

    install_signal_handlers();
    let workers: Vec<u32> = cfg
        .cores
        .iter()
        .copied()
        .filter(|c| specs.iter().any(|s| s.1.core == *c))
        .collect();
    let progress: Vec<Progress> = workers.iter().map(|_| Progress::default()).collect();
    let barrier = Barrier::new(workers.len());
    let outcomes: Mutex<Vec<(usize, Outcome)>> = Mutex::new(Vec::new());
    // The poll loop's counters of every queue pair, each once (for the total).
    let core_counters: Mutex<Vec<PollCounters>> = Mutex::new(Vec::new());
    let elapsed: Mutex<Vec<(u32, u64)>> = Mutex::new(Vec::new());
    // Interrupt-mode sleeps and I/Os of the whole run, and the process's CPU time from the end
    // of the set-up (queue pairs and buffers made: every worker passed the barrier) to the end.
    let sleeps_ios: Mutex<(u64, u64, u64)> = Mutex::new((0, 0, 0));
    let cpu_before: Mutex<Option<(f64, f64)>> = Mutex::new(None);
    // The whole system's CPU time (`/proc/stat`) over the same interval.
    let system_before: Mutex<Option<cpustat::Sampler>> = Mutex::new(None);
    let setup_errors: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let setup_failed = AtomicBool::new(false);
    let tty = !cfg.json && report::stdout_is_tty();

    // --reset-after-ios: one plan per controller, shared by its queue pairs on every core.
    let plans: Vec<Option<Arc<device::ResetPlan>>> = ctrls
        .iter()
        .map(|c| {
            let n = cfg.reset_after_ios?;
            Some(Arc::new(device::ResetPlan::new(c.ctrl.pcie()?.clone(), n)))
        })
        .collect();
    let plans = &plans;
    std::thread::scope(|scope| {
        for (w, &core) in workers.iter().enumerate() {
            let my: Vec<(usize, JobSpec)> = specs
                .iter()
                .enumerate()
                .filter(|(_, s)| s.1.core == core)
                .map(|(i, s)| (i, s.1.clone()))
                .collect();
            let (entries, ctrls, settings, barrier, progress) =
                (&entries, &ctrls, &settings, &barrier, &progress[w]);
            let (outcomes, elapsed, setup_errors, setup_failed) =
                (&outcomes, &elapsed, &setup_errors, &setup_failed);
            let (core_counters, sleeps_ios, cpu_before, system_before) =
                (&core_counters, &sleeps_ios, &cpu_before, &system_before);
            let specs_e: Vec<usize> = my.iter().map(|(i, _)| specs[*i].0).collect();
            scope.spawn(move || {
                if let Err(e) = pin_to(core) {
                    setup_errors
                        .lock()
                        .unwrap()
                        .push(format!("failed to pin a worker to core {core}: {e}"));
                    setup_failed.store(true, Ordering::Relaxed);
                }
                // -P queue pairs per controller on this core, shared by its namespaces' jobs.
                let mut shared: Vec<(usize, Vec<SharedQueue<DriverQueue>>)> = Vec::new();
                let mut jobs = Vec::new();
                for ((idx, spec), e) in my.into_iter().zip(specs_e.iter().copied()) {
                    let ci = entries[e].ctrl;
                    let pos = match shared.iter().position(|s| s.0 == ci) {
                        Some(p) => p,
                        None => {
                            let sharers =
                                specs_e.iter().filter(|&&x| entries[x].ctrl == ci).count();
                            match make_queues(
                                cfg,
                                &ctrls[ci],
                                entries,
                                ci,
                                sharers,
                                core,
                                plans[ci].clone(),
                            ) {
                                Ok(qs) => shared.push((ci, qs)),
                                Err(msg) => {
                                    setup_errors.lock().unwrap().push(msg);
                                    setup_failed.store(true, Ordering::Relaxed);
                                    break;
                                }
                            }
                            shared.len() - 1
                        }
                    };
                    match make_job(cfg, &ctrls[ci], &shared[pos].1, spec, settings, clock.hz()) {
                        Ok((j, q)) => jobs.push((idx, j, q, ci)),
                        Err(msg) => {
                            setup_errors.lock().unwrap().push(msg);
                            setup_failed.store(true, Ordering::Relaxed);
                        }
                    }
                }
                if barrier.wait().is_leader() {
                    *cpu_before.lock().unwrap() = cpu_time();
                    *system_before.lock().unwrap() = match cpustat::Sampler::start() {
                        Ok(s) => Some(s),
                        Err(e) => {
                            log::warn!("no whole-system CPU time: {e}");
                            None
                        }
                    };
                }
                if setup_failed.load(Ordering::Relaxed) {
                    progress.finished.store(true, Ordering::Relaxed);
                    return;
                }
                let mut idxs = Vec::new();
                let mut js: Vec<Job<DriverQueue>> = Vec::new();
                let mut qs = Vec::new();
                let mut ci_of = Vec::new();
                for (i, j, q, ci) in jobs {
                    idxs.push(i);
                    js.push(j);
                    qs.push(q);
                    ci_of.push(ci);
                }
                let r = engine::run(&mut js, settings, &clock, progress, &STOP);
                elapsed.lock().unwrap().push((core, r.elapsed_ticks));
                {
                    let mut t = sleeps_ios.lock().unwrap();
                    t.0 += r.sleeps;
                    t.1 += r.completed;
                    t.2 += r.sleep_limit_hits;
                }
                // The poll loop's counters of each queue pair of this core (PCIe only): a
                // namespace's row shows those of the queue pairs it used, shared ones
                // included; the total counts each queue pair once.
                let per_ctrl: Vec<(usize, Vec<PollCounters>)> = shared
                    .iter()
                    .map(|(ci, qs)| {
                        let c = qs
                            .iter()
                            .filter_map(|q| q.with(|d| d.qp.stats()))
                            .map(|st| PollCounters::of(&st))
                            .collect();
                        (*ci, c)
                    })
                    .collect();
                core_counters
                    .lock()
                    .unwrap()
                    .extend(per_ctrl.iter().flat_map(|(_, c)| c.iter().copied()));
                let mut out = outcomes.lock().unwrap();
                for (((idx, j), queues), e) in idxs.into_iter().zip(js).zip(qs).zip(&ci_of) {
                    let per_qp: &[PollCounters] = per_ctrl
                        .iter()
                        .find(|(ci, _)| ci == e)
                        .map_or(&[], |(_, c)| c.as_slice());
                    out.push((
                        idx,
                        Outcome {
                            name: j.spec.name.clone(),
                            nsid: j.spec.nsid,
                            core: j.spec.core,
                            stats: j.stats.clone(),
                            verify: j.verify.clone(),
                            failure: j.failure.clone(),
                            abandoned: j.abandoned,
                            doubles: j.doubles,
                            queues,
                            counters: PollCounters::sum(per_qp),
                        },
                    ));
                }
            });
        }
        // The progress line, once a second, on a terminal only.
        let mut last = 0u64;
        let mut last_busy = (0u64, 0u64);
        let mut tick = 0u32;
        let mut admin_failed = vec![false; ctrls.len()];
        while !progress.iter().all(|p| p.finished.load(Ordering::Relaxed)) {
            std::thread::sleep(Duration::from_millis(50));
            tick += 1;
            // Keep Alive of TCP controllers (nothing for PCIe); a lost controller's queues
            // fail their I/O on their own.
            for (c, failed) in ctrls.iter().zip(admin_failed.iter_mut()) {
                if !*failed {
                    if let Err(e) = c.ctrl.process_admin() {
                        eprintln!("{}: admin queue failed: {e}", c.label);
                        *failed = true;
                    }
                }
            }
            if tty && tick % 20 == 0 {
                let done: u64 = progress
                    .iter()
                    .map(|p| p.completed.load(Ordering::Relaxed))
                    .sum();
                let busy: u64 = progress
                    .iter()
                    .map(|p| p.busy.load(Ordering::Relaxed))
                    .sum();
                let idle: u64 = progress
                    .iter()
                    .map(|p| p.idle.load(Ordering::Relaxed))
                    .sum();
                let warm = progress.iter().any(|p| p.warmup.load(Ordering::Relaxed));
                let b = cfg.cpu_usage.then(|| {
                    (
                        workers.len(),
                        report::busy_pct(busy - last_busy.0, idle.saturating_sub(last_busy.1)),
                    )
                });
                print!("{}\r", report::progress(warm, done - last, cfg.io_size, b));
                let _ = std::io::stdout().flush();
                last = done;
                last_busy = (busy, idle);
            }
        }
        if tty && tick >= 20 {
            // Erase the progress line.
            print!("\x1b[2K");
        }
    });

    let cpu = cpu_time()
        .zip(cpu_before.into_inner().unwrap())
        .map(|((u1, s1), (u0, s0))| (u1 - u0, s1 - s0));
    let system = system_before
        .into_inner()
        .unwrap()
        .and_then(|s| match s.finish() {
            Ok(d) => Some(d),
            Err(e) => {
                log::warn!("no whole-system CPU time: {e}");
                None
            }
        });
    let (sleeps, all_ios, limit_hits) = sleeps_ios.into_inner().unwrap();
    let cpu = cpu.map(|(user_s, sys_s)| {
        let mut c = json::Cpu::new(cfg.interrupt, user_s, sys_s, all_ios, sleeps);
        c.sleep_limit_hits = limit_hits;
        c.system = system.map(|d| json::SystemCpu::new(&d, all_ios));
        c
    });
    let errors = setup_errors.into_inner().unwrap();
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let mut outcomes = outcomes.into_inner().unwrap();
    outcomes.sort_by_key(|o| o.0);
    let elapsed = elapsed.into_inner().unwrap();
    let main_core = workers[0];
    let elapsed_ticks = elapsed.iter().find(|e| e.0 == main_core).map_or(0, |e| e.1);
    let elapsed_us = clock.ticks_to_us(elapsed_ticks);
    let rows: Vec<Row<'_>> = outcomes
        .iter()
        .map(|(_, o)| Row {
            name: &o.name,
            nsid: o.nsid,
            core: o.core,
            stats: &o.stats,
        })
        .collect();
    let hz = clock.hz();

    // verify: totals and the first mismatch.
    let verify = (cfg.workload == Workload::Verify).then(|| {
        let mut v = json::Verify {
            blocks_checked: 0,
            mismatches: 0,
            first_mismatch: None,
        };
        for (_, o) in &outcomes {
            v.blocks_checked += o.verify.blocks_checked;
            v.mismatches += o.verify.bad_blocks;
            if v.first_mismatch.is_none() {
                v.first_mismatch = o.verify.first.map(|b| json::Mismatch {
                    name: o.name.clone(),
                    nsid: o.nsid,
                    lba: b.lba,
                    offset: b.offset,
                    expected: b.expected,
                    got: b.got,
                });
            }
        }
        v
    });
    let failures: Vec<&str> = outcomes
        .iter()
        .filter_map(|(_, o)| o.failure.as_deref())
        .collect();

    if cfg.json {
        let (mut devices, total) = json::devices(&rows, elapsed_us, cfg.io_size, hz, cfg.cpu_usage);
        for (d, (_, o)) in devices.iter_mut().zip(&outcomes) {
            d.counters = Some(o.counters);
        }
        let mut doc = json::PerfReport {
            schema: json::PERF_SCHEMA.to_string(),
            target: ctrls
                .iter()
                .map(|c| c.label.clone())
                .collect::<Vec<_>>()
                .join(", "),
            config: json::Config {
                queue_depth: cfg.queue_depth,
                io_size: cfg.io_size,
                workload: cfg.workload,
                rwmixread: cfg.rwmixread,
                time_secs: cfg.time_secs,
                warmup_secs: cfg.warmup_secs,
                cores: cfg.cores.clone(),
                qpairs_per_ns: cfg.qpairs_per_ns,
                number_ios: cfg.number_ios,
                doorbell: cfg.doorbell,
                shadow_doorbells: cfg.shadow_doorbells,
                seed,
            },
            clock: json::ClockInfo {
                source: match clock.source() {
                    Source::Tsc => "tsc",
                    Source::MonotonicRaw => "monotonic_raw",
                }
                .to_string(),
                hz,
            },
            elapsed_us,
            devices,
            total,
            verify: verify.clone(),
            warnings,
            queues: Vec::new(),
            emulated: None,
            counters: Some(PollCounters::sum(core_counters.lock().unwrap().iter())),
            cpu: cpu.clone(),
        };
        let emu_stats: Vec<_> = ctrls
            .iter()
            .filter_map(|c| c.emulated.as_ref().map(|e| (c.label.as_str(), e.stats())))
            .collect();
        for (_, o) in &outcomes {
            let stats = emu_stats
                .iter()
                .find(|(l, _)| o.name.starts_with(&format!("{l} NSID ")))
                .map(|(_, st)| st);
            for &(qid, entries) in &o.queues {
                doc.queues.push(json::QueueInfo {
                    name: o.name.clone(),
                    core: o.core,
                    qid,
                    entries,
                    commands: stats.map(|st| st.queue_commands(qid)),
                });
            }
        }
        if !emu_stats.is_empty() {
            doc.emulated = Some(json::EmulatedCounters {
                doorbell_writes: emu_stats.iter().map(|s| s.1.doorbell_writes).sum(),
                io_commands: emu_stats.iter().map(|s| s.1.io_commands()).sum(),
                faults_fired: emu_stats.iter().map(|s| s.1.faults_fired).sum(),
            });
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
    } else {
        print!(
            "{}",
            report::full(&rows, elapsed_us, cfg.io_size, hz, cfg.latency_level)
        );
        if cfg.latency_level >= 1 {
            let c: Vec<_> = outcomes
                .iter()
                .map(|(_, o)| (o.name.as_str(), o.core, o.counters))
                .collect();
            print!("{}", counters::table(&c));
        }
        if let Some(c) = cpu
            .as_ref()
            .filter(|_| cfg.cpu_usage || cfg.interrupt.sleeps())
        {
            println!(
                "CPU time ({}): {:.2} s user, {:.2} s system, {:.2} us per I/O; {:.3} sleeps per I/O, {} at the 10 ms limit",
                c.mode, c.user_s, c.sys_s, c.us_per_io, c.sleeps_per_io, c.sleep_limit_hits
            );
            if let Some(s) = &c.system {
                println!("{}", s.line());
            }
        }
        if cfg.cpu_usage {
            for &core in &workers {
                let (b, i) = outcomes
                    .iter()
                    .filter(|(_, o)| o.core == core)
                    .fold((0, 0), |(b, i), (_, o)| {
                        (b + o.stats.busy_ticks, i + o.stats.idle_ticks)
                    });
                println!("Core {core:2}: {:6.2}% Busy", report::busy_pct(b, i));
            }
        }
        if let Some(v) = &verify {
            println!(
                "Verify: {} blocks checked, {} mismatched",
                v.blocks_checked, v.mismatches
            );
        }
        // SPDK logs each failed I/O (rate limited by -Q); the count of all of them, here.
        let errors: u64 = outcomes.iter().map(|(_, o)| o.stats.io_errors).sum();
        if errors > 0 {
            println!(
                "I/O errors: {errors} ({})",
                outcomes
                    .iter()
                    .filter(|(_, o)| o.stats.io_errors > 0)
                    .map(|(_, o)| format!("{} from core {}: {}", o.name, o.core, o.stats.io_errors))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    if let Some(path) = &cfg.plot {
        let series: Vec<plot::Series> = rows
            .iter()
            .filter_map(|r| plot::series(&format!("{}, core {}", r.name, r.core), r.stats, hz))
            .collect();
        let mix = cfg
            .rwmixread
            .map(|m| format!(" -M {m}"))
            .unwrap_or_default();
        let title = format!(
            "{}{mix} -q {} -o {}: latency by percentile",
            cfg.workload, cfg.queue_depth, cfg.io_size
        );
        std::fs::write(path, plot::svg(&title, &series))
            .map_err(|e| format!("failed to write the plot to {}: {e}", path.display()))?;
    }
    let mut ok = true;
    for f in &failures {
        eprintln!("{f}");
        ok = false;
    }
    if let Some(f) = cfg.emulated.fault.filter(|_| cfg.uses_emulated()) {
        eprintln!("{}", fault_summary(f, &ctrls, &outcomes));
    }
    // A run cut short (a failed queue, a removed device) or one that went on past errors (-Q):
    // how every I/O it started ended.
    let (submitted, completed, errors) = outcomes.iter().fold((0, 0, 0), |(s, c, e), (_, o)| {
        (
            s + o.stats.io_submitted,
            c + o.stats.io_completed,
            e + o.stats.io_errors,
        )
    });
    if !failures.is_empty() || errors > 0 {
        eprintln!(
            "I/O counts: {submitted} submitted, {completed} completed ({errors} with an error), \
             {} never completed",
            submitted.saturating_sub(completed)
        );
    }
    for p in plans.iter().flatten() {
        match p.error.lock().unwrap().take() {
            Some(e) => {
                eprintln!("{e}");
                ok = false;
            }
            None if p.fired() => eprintln!("perf: the controller was reset once, under I/O"),
            None => {
                // Asked for and not done: the run did not test what it was asked to.
                eprintln!(
                    "perf: the controller reset did not fire (the run ended first); lower \
                     --reset-after-ios or raise -t"
                );
                ok = false;
            }
        }
    }
    if let Some(v) = &verify {
        if let Some(m) = &v.first_mismatch {
            eprintln!(
                "verify FAILED: {} of {} blocks mismatched; first: {} LBA {} offset {}: expected {:#04x}, got {:#04x}",
                v.mismatches, v.blocks_checked, m.name, m.lba, m.offset, m.expected, m.got
            );
            ok = false;
        }
    }
    if STOP.load(Ordering::Relaxed) {
        eprintln!("perf: interrupted");
    }
    Ok(ok)
}

/// `--emulated-fault`'s line: whether it fired and what became of the I/Os, e.g.
/// `perf: emulated fault cfs:100 (...): fired 1 time; I/Os submitted=108 completed=108
/// failed=8 never-completed=0 double=0`.
fn fault_summary(
    f: crate::cli::EmulatedFault,
    ctrls: &[Device],
    outcomes: &[(usize, Outcome)],
) -> String {
    let fired: u64 = ctrls
        .iter()
        .filter_map(|c| c.emulated.as_ref())
        .map(|e| e.stats().faults_fired)
        .sum();
    let sum = |g: fn(&Outcome) -> u64| outcomes.iter().map(|(_, o)| g(o)).sum::<u64>();
    let fired = match fired {
        0 => "did not fire (the run ended first)".to_string(),
        1 => "fired 1 time".to_string(),
        n => format!("fired {n} times"),
    };
    format!(
        "perf: emulated fault {f}: {fired}; I/Os submitted={} completed={} failed={} never-completed={} \
         double={}",
        sum(|o| o.stats.io_submitted),
        sum(|o| o.stats.io_completed),
        sum(|o| o.stats.io_errors),
        sum(|o| o.abandoned),
        sum(|o| o.doubles),
    )
}

/// The error for a discovery controller named for I/O: what it offers instead.
fn discovery_refused(label: &str, t: &dioxide::TcpController) -> String {
    let mut m = format!(
        "{label} is a discovery controller, it has no namespaces; name an NVM subsystem with subnqn:"
    );
    match t.discover() {
        Ok(list) if !list.is_empty() => {
            for e in list {
                m.push_str(&format!(
                    "\n  subnqn:{} (traddr:{} trsvcid:{})",
                    e.subnqn, e.traddr, e.trsvcid
                ));
            }
        }
        Ok(_) => m.push_str(" (its discovery log lists none)"),
        Err(e) => m.push_str(&format!(" (its discovery log could not be read: {e})")),
    }
    m
}

/// The process's user and system CPU time so far, seconds (`getrusage(RUSAGE_SELF)`: every
/// thread, the emulated controller's included).
fn cpu_time() -> Option<(f64, f64)> {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some((secs(r.ru_utime), secs(r.ru_stime)))
}

/// The I/O queue size: `--io-queue-size`, at most the controller's MQES + 1.
fn queue_entries(cfg: &PerfConfig, c: &Device) -> u32 {
    let max = c.ctrl.cap().mqes() as u32 + 1;
    cfg.io_queue_size.map_or(max, |q| q.min(max)).min(65535)
}

/// (qid, entries) of a job's queue pairs.
type QueueList = Vec<(u16, u16)>;

/// Refuses, before any queue is created, a run whose `-P` and `-c` ask a controller for more
/// I/O queues than it granted: each core that has a namespace of the controller opens `-P`
/// queue pairs on it, shared by those namespaces.
fn check_queue_budget(
    cfg: &PerfConfig,
    ctrls: &[Device],
    entries: &[NsEntry],
    specs: &[(usize, JobSpec)],
) -> Result<(), String> {
    for (ci, c) in ctrls.iter().enumerate() {
        let mut cores: Vec<u32> = specs
            .iter()
            .filter(|(e, _)| entries[*e].ctrl == ci)
            .map(|(_, s)| s.core)
            .collect();
        cores.sort_unstable();
        cores.dedup();
        let needed = cores.len() as u64 * cfg.qpairs_per_ns as u64;
        let granted = c.ctrl.io_queues() as u64;
        if needed > granted {
            return Err(format!(
                "{}: -P {} queue pair(s) per core on {} core(s) (-c) need {needed} I/O queues, but \
                 the controller granted {granted}; lower -P or use fewer cores (-c)",
                c.label,
                cfg.qpairs_per_ns,
                cores.len()
            ));
        }
    }
    Ok(())
}

/// Commands one I/O of `-o` bytes takes: one, or its children plus the parent when it is split
/// at the controller's maximum transfer size.
fn requests_per_io(cfg: &PerfConfig, c: &Device) -> u64 {
    let mt = c.ctrl.max_transfer() as u64;
    if cfg.io_size > mt {
        cfg.io_size.div_ceil(mt) + 1
    } else {
        1
    }
}

/// The `-P` queue pairs of one core on controller `ci`, serving its namespaces; `sharers` jobs
/// of `-q` I/Os each will share them.
fn make_queues(
    cfg: &PerfConfig,
    c: &Device,
    entries: &[NsEntry],
    ci: usize,
    sharers: usize,
    core: u32,
    reset: Option<Arc<device::ResetPlan>>,
) -> Result<Vec<SharedQueue<DriverQueue>>, String> {
    let qentries = queue_entries(cfg, c) as u16;
    // Any job may put all of its I/Os on one queue pair: room for every sharer's.
    let requests = (cfg.queue_depth as u64 * requests_per_io(cfg, c) * sharers.max(1) as u64)
        .clamp(1, 65534) as u16;
    let doorbell = match cfg.doorbell {
        DoorbellMode::PerBatch => dioxide::DoorbellMode::PerBatch,
        DoorbellMode::PerCommand => dioxide::DoorbellMode::PerCommand,
    };
    let nss: Vec<Namespace> = entries
        .iter()
        .filter(|e| e.ctrl == ci)
        .map(|e| e.ns.clone())
        .collect();
    let mut qs: Vec<SharedQueue<DriverQueue>> = Vec::new();
    for k in 0..cfg.qpairs_per_ns {
        let mut opts = QueueOptions::default()
            .with_entries(qentries)
            .with_requests(requests)
            .with_doorbell(doorbell)
            .with_interrupts(cfg.interrupt.sleeps())
            .with_cq_head_batch(cfg.cq_head_batch);
        if let Some(t) = cfg.io_timeout {
            opts = opts.with_timeout(t);
        }
        let qp = c.ctrl.create_qpair::<u64>(opts).map_err(|e| {
            format!(
                "ERROR: failed to create I/O queue pair {} of {} for {} on core {core}: {e}",
                k + 1,
                cfg.qpairs_per_ns,
                c.label
            )
        })?;
        let q = DriverQueue {
            qp,
            nss: nss.clone(),
            location: c.addr.clone(),
            reset: reset.clone(),
        };
        // Siblings: a job's buffers (kept by its first queue pair) outlive all of them.
        let shared = match qs.first() {
            None => SharedQueue::new(q),
            Some(first) => first.sibling(q),
        };
        qs.push(shared);
    }
    Ok(qs)
}

fn make_job(
    cfg: &PerfConfig,
    c: &Device,
    shared: &[SharedQueue<DriverQueue>],
    spec: JobSpec,
    s: &Settings,
    hz: u64,
) -> Result<(Job<DriverQueue>, QueueList), String> {
    let mut qps = Vec::new();
    for q in shared {
        qps.push(q.handle().ok_or_else(|| {
            format!(
                "ERROR: {}: more than {} namespaces share a queue pair on core {}",
                spec.name,
                engine::MAX_JOBS,
                spec.core
            )
        })?);
    }
    let queues = shared
        .iter()
        .map(|q| q.with(|d| (d.qp.qid().0, d.qp.entries())))
        .collect();
    let mut bufs = Vec::with_capacity(cfg.queue_depth as usize);
    for _ in 0..cfg.queue_depth {
        let b = c
            .ctrl
            .alloc(cfg.io_size as usize)
            .map_err(|e| format!("ERROR: {}: {e}", spec.name))?;
        bufs.push(DriverBuf(b));
    }
    Ok((Job::new(spec, qps, bufs, s, hz), queues))
}
