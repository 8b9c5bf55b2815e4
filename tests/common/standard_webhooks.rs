//! The Python `standardwebhooks` package, an off-the-shelf Standard Webhooks verifier: found
//! by `python3`, or installed once into cargo's target directory from PyPI, so `cargo test`
//! needs nothing installed by hand beyond Python.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use super::webhook_receiver::Received;

/// Where it was installed, when it was not importable already.
fn target() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("standardwebhooks")
}

fn importable(path: Option<&PathBuf>) -> bool {
    let mut python = Command::new("python3");
    if let Some(path) = path {
        python.env("PYTHONPATH", path);
    }
    python
        .args(["-c", "import standardwebhooks"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A `python3` that can import `standardwebhooks`, or None when it is missing and the caller
/// chose to skip (see [`super::tools::missing`]).
pub fn python() -> Option<Command> {
    static FOUND: OnceLock<Option<Option<PathBuf>>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        if importable(None) {
            return Some(None);
        }
        let dir = target();
        if importable(Some(&dir)) {
            return Some(Some(dir));
        }
        eprintln!(
            "standardwebhooks not found: installing it into {}",
            dir.display()
        );
        let installed = super::tools::pip_install_into(&dir, "standardwebhooks");
        (installed && importable(Some(&dir))).then_some(Some(dir))
    });
    match found {
        Some(path) => {
            let mut python = Command::new("python3");
            if let Some(path) = path {
                python.env("PYTHONPATH", path);
            }
            Some(python)
        }
        None => {
            super::tools::missing(
                "STANDARDWEBHOOKS",
                "the Python package standardwebhooks",
                "`pip install standardwebhooks`",
            );
            None
        }
    }
}

/// Checks every request of `received` with `standardwebhooks`' own verifier under `secret`;
/// panics naming the first that fails. False when the verifier is missing and skipped.
pub fn verify_all(received: &[Received], secret: &str) -> bool {
    let Some(mut python) = python() else {
        return false;
    };
    let mut file = tempfile();
    for r in received {
        let line = serde_json::json!({
            "id": r.id, "timestamp": r.timestamp, "signature": r.signature, "body": r.body,
        });
        writeln!(file.1, "{line}").unwrap();
    }
    drop(file.1);
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
webhook = Webhook(sys.argv[2])
for n, line in enumerate(open(sys.argv[1])):
    r = json.loads(line)
    headers = {"webhook-id": r["id"], "webhook-timestamp": r["timestamp"],
               "webhook-signature": r["signature"]}
    try:
        webhook.verify(r["body"], headers)
    except Exception as e:
        sys.exit(f"request {n} ({r['id']}) does not verify: {e!r}")
"#;
    let out = python
        .args(["-c", script])
        .arg(&file.0)
        .arg(secret)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file.0);
    assert!(
        out.status.success(),
        "standardwebhooks refused a delivery: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

fn tempfile() -> (PathBuf, std::fs::File) {
    let path =
        std::env::temp_dir().join(format!("roomctl-webhooks-{}.jsonl", uuid::Uuid::new_v4()));
    let file = std::fs::File::create(&path).unwrap();
    (path, file)
}
