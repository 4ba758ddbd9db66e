//! `identify`: controller and namespace data, like spdk_nvme_identify.

fn main() -> std::process::ExitCode {
    dioxide_tools::logger::init();
    dioxide_tools::identify::main(std::env::args())
}
