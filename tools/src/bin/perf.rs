//! `perf`: spdk_nvme_perf's options and report, on Dioxide.

use dioxide_tools::cli::{self, Parsed};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cfg = match cli::parse_perf(std::env::args()) {
        Ok(Parsed::Help(h)) => {
            print!("{h}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Run(c)) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for w in &cfg.warnings {
        eprintln!("{w}");
    }
    eprintln!("perf: the I/O path is not wired to the driver yet");
    ExitCode::FAILURE
}
