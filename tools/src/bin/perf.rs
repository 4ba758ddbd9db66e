//! `perf`: spdk_nvme_perf's options and report, on Dioxide.

fn main() -> std::process::ExitCode {
    dioxide_tools::logger::init();
    dioxide_tools::perf::main(std::env::args())
}
