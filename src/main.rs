//! The `roomctl` binary; everything lives in the library's [`roomctl::cli`].

fn main() -> std::process::ExitCode {
    roomctl::cli::main()
}
