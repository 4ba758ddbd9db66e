//! `ctxsw`: round-trip cost between two threads of one process and between two processes.

fn main() -> std::process::ExitCode {
    dioxide_tools::ctxsw::main(std::env::args())
}
