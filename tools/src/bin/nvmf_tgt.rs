//! `nvmf_tgt`: serve Dioxide namespaces over NVMe/TCP (like SPDK's `nvmf_tgt`).

fn main() -> std::process::ExitCode {
    dioxide_tools::logger::init();
    dioxide_tools::nvmf_tgt::main(std::env::args())
}
