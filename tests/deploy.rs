//! The config file that scripts/deploy/kubernetes/swapd.yaml ships in its ConfigMap starts a
//! real `swapd serve`: every key it sets exists and holds a valid value. (The schema and
//! grace-period checks of the manifests are scripts/deploy/validate.sh's.)
mod common;

use std::path::Path;

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
    let dir_s = dir.path().to_str().unwrap();
    let state = dir.path().join("state");
    let served = common::process::Served::start(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--models-root",
            dir_s,
            "--state-dir",
            state.to_str().unwrap(),
            "--control-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[("SWAPD_ADMIN_TOKEN", common::TOKEN)],
    );
    // It logged `serving` (or `start` would have failed, with the log).
    assert!(served.log_text().contains("serving"), "{toml}");
}
