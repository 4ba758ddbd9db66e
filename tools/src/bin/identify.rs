//! `identify`: controller and namespace data, like spdk_nvme_identify.

use dioxide_tools::cli::{self, Parsed};
use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::parse_identify(std::env::args()) {
        Ok(Parsed::Help(h)) => {
            print!("{h}");
            ExitCode::SUCCESS
        }
        Ok(Parsed::Run(_)) => {
            eprintln!("identify: not wired to the driver yet");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
