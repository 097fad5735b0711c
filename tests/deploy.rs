//! The config file that scripts/deploy/kubernetes/swapd.yaml ships in its ConfigMap starts a
//! real `swapd serve`: every key it sets exists and holds a valid value. (The schema and
//! grace-period checks of the manifests are scripts/deploy/validate.sh's.)
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_swapd");

/// The `swapd.toml: |` block of the ConfigMap, unindented.
fn configmap_toml() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deploy/kubernetes/swapd.yaml");
    let yaml = std::fs::read_to_string(path).unwrap();
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "swapd.toml: |")
        .skip(1);
    let mut out = String::new();
    for l in lines.by_ref() {
        if !(l.starts_with("    ") || l.trim().is_empty()) {
            break;
        }
        out.push_str(l.strip_prefix("    ").unwrap_or(""));
        out.push('\n');
    }
    assert!(out.contains("listen"), "no swapd.toml in the ConfigMap");
    out
}

#[test]
fn the_kubernetes_configmap_config_starts_a_server() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_config(dir.path());
    let toml = configmap_toml();
    let cfg = dir.path().join("swapd.toml");
    std::fs::write(&cfg, &toml).unwrap();
    // The pod's paths and ports, pointed at this test's: flags override the file.
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--models-root")
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("SWAPD_ADMIN_TOKEN", common::TOKEN)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = Vec::new();
    let served = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("\"serving\"") => break true,
            Ok(line) => log.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        served,
        "swapd serve with the ConfigMap's config did not start:\n{toml}\n{}",
        log.join("\n")
    );
}
