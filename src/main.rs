//! The `roomctl` binary; everything lives in the library's [`roomctl::cli`].

/// glibc's allocator grows and trims its per-thread heaps with mmap/mprotect under gRPC load
/// (measured: ~10% of server CPU in the DropUser benchmark); mimalloc keeps memory in
/// thread-local pages instead.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    roomctl::cli::main()
}
