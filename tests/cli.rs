//! The `swapd` binary as an operator runs it: serve, the client commands, config errors,
//! startup failures and SIGTERM, against tiny generated models on loopback.
mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::process::{Served, BIN};
use common::tiny_config;

/// Starts `swapd serve` on `root` and waits for its `serving` log line.
fn serve(root: &Path, extra: &[&str]) -> Served {
    let mut args = vec!["--models-root", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    Served::start(&args, &[])
}

fn client(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--server", url])
        .output()
        .unwrap()
}

/// `swapd models`' row for `name` (empty if absent).
fn model_line(url: &str, name: &str) -> String {
    text(&client(url, &["models"]).stdout)
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_default()
        .to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn serve_then_smoke_models_generate_and_embed() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let s = serve(dir.path(), &[]);

    let out = client(&s.url, &["smoke"]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("smoke: all checks passed"));

    let out = client(&s.url, &["models"]);
    assert!(out.status.success());
    let table = text(&out.stdout);
    assert!(
        table.contains("tiny-llm") && table.contains("tiny-bert") && table.contains("cpu"),
        "{table}"
    );

    let out = client(
        &s.url,
        &[
            "generate",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "hello",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary = text(&out.stderr);
    assert!(
        summary.contains("tiny-llm version") && summary.contains("completion 5 tokens"),
        "{summary}"
    );

    let out = client(&s.url, &["embed", "--json", "hello world"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dimension"], 32);
    assert_eq!(v["model"], "tiny-bert");
    assert_eq!(v["embeddings"][0]["values"].as_array().unwrap().len(), 32);
}

#[test]
fn smoke_fails_when_a_check_cannot_pass() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    // Only the LLM is served, so the embedding check must fail.
    let s = serve(dir.path(), &["--models", "tiny-llm"]);
    let out = client(&s.url, &["smoke"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("serves no Embedding model"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let mut s = serve(dir.path(), &[]);
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve_output(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let root = dir.path().to_str().unwrap();

    let out = serve_output(&["--models-root", root, "--device", "gpu"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("device") && text(&out.stderr).contains("`gpu`"),
        "{}",
        text(&out.stderr)
    );

    let out = serve_output(&["--models-root", "/definitely/not/here"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("models_root"),
        "{}",
        text(&out.stderr)
    );

    let cfg = dir.path().join("swapd.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nmax_concurent = 3\n").unwrap();
    let out = serve_output(
        &["--config", cfg.to_str().unwrap(), "--models-root", root],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("swapd.toml")
            && err.contains("max_concurent")
            && err.contains("unknown field"),
        "{err}"
    );

    // The environment overrides the file (and is validated the same way).
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\n").unwrap();
    let out = serve_output(
        &["--config", cfg.to_str().unwrap(), "--models-root", root],
        &[("SWAPD_LISTEN", "not-an-address")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not-an-address"),
        "{}",
        text(&out.stderr)
    );

    let out = serve_output(&["--models-root", root, "--models", "tiny-llm,ghost"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("`ghost` is not in"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_broken_model_fails_startup_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    std::fs::write(dir.path().join("tiny-llm").join("tiny.gguf"), b"garbage").unwrap();
    let out = serve_output(
        &[
            "--models-root",
            dir.path().to_str().unwrap(),
            "--device",
            "cpu",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("startup failed") && err.contains("sha256 mismatch"),
        "{err}"
    );
}

#[test]
fn cuda_without_the_feature_is_a_clear_startup_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let out = serve_output(
        &[
            "--models-root",
            dir.path().to_str().unwrap(),
            "--device",
            "cuda",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("built without the `cuda` feature"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn reload_rollback_and_status_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let s = serve(dir.path(), &["--admin-token", "s3cret"]);
    let admin = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .args(["--server", &s.url])
            .env("SWAPD_ADMIN_TOKEN", "s3cret")
            .output()
            .unwrap()
    };
    let out = admin(&["reload", "tiny-llm", "--keep-previous", "--force"]);
    let o = text(&out.stdout);
    assert!(out.status.success(), "{o}{}", text(&out.stderr));
    assert!(
        o.contains("preflight") && o.contains("committed") && o.contains("(generation 2)"),
        "{o}"
    );

    let out = admin(&["status"]);
    let o = text(&out.stdout);
    assert!(
        out.status.success() && o.contains("tiny-llm") && o.contains("(resident)"),
        "{o}"
    );

    let out = admin(&["rollback", "tiny-llm"]);
    let o = text(&out.stdout);
    assert!(
        out.status.success() && o.contains("(generation 3)") && !o.contains("load "),
        "{o}"
    );

    let out = admin(&[
        "reload",
        "tiny-llm",
        "--sha256",
        &format!("tiny.gguf={}", "0".repeat(64)),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("not committed: failed in verify"),
        "{}",
        text(&out.stdout)
    );

    // Without the token the call is refused.
    let out = client(&s.url, &["status"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("admin token"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn after_kill_9_a_restart_serves_the_last_committed_version() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let (src, pins) = common::tiny_version(dir.path(), 2, "");
    let pin = format!("v2.gguf={}", pins["v2.gguf"]);
    let mut s = serve(dir.path(), &["--admin-token", "s3cret"]);
    let out = Command::new(BIN)
        .args(["reload", "tiny-llm", "--source", &src, "--sha256", &pin])
        .args(["--server", &s.url, "--token", "s3cret"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    let v2_line = model_line(&s.url, "tiny-llm");
    assert!(v2_line.contains(" 2 "), "{v2_line}");

    s.child.kill().unwrap(); // SIGKILL: no chance to clean up
    s.child.wait().unwrap();
    drop(s);
    let s = serve(dir.path(), &["--admin-token", "s3cret"]);
    let line = model_line(&s.url, "tiny-llm");
    assert_eq!(
        line, v2_line,
        "after a restart the committed version serves"
    );

    let audit = std::fs::read_to_string(dir.path().join(".swapd").join("audit.jsonl")).unwrap();
    // The commit line (written before the swap), then the end line with every phase.
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["stage"], "commit");
    assert_eq!(lines[0]["to_generation"], 2);
    let rec = &lines[1];
    assert_eq!(rec["stage"], "end");
    assert_eq!(rec["model"], "tiny-llm");
    assert_eq!(rec["action"], "reload");
    assert_eq!(rec["committed"], true);
    assert_eq!(rec["to_generation"], 2);
    assert!(
        rec["actor"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{rec}"
    );
    assert_eq!(rec["phases_ms"].as_array().unwrap().len(), 8);
}

#[test]
fn sighup_reloads_a_changed_manifest_entry() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let s = serve(dir.path(), &["--control-auth", "false"]);
    let (src, pins) = common::tiny_version(dir.path(), 2, "");
    common::point_manifest_at(dir.path(), &src, &pins);
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    loop {
        let line = model_line(&s.url, "tiny-llm");
        if line.contains(" 2 ") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "SIGHUP did not reload: {line}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The embedding model's entry did not change: still generation 1.
    let bert = model_line(&s.url, "tiny-bert");
    assert!(bert.contains(" 1 "), "{bert}");
}

#[test]
fn the_control_service_can_listen_on_its_own_address() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let s = serve(
        dir.path(),
        &["--control-auth", "false", "--control-listen", "127.0.0.1:0"],
    );
    let control_url = s.control_url.clone().expect("a control address");
    let out = client(&control_url, &["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("tiny-llm"));
    // Not on the inference address…
    let out = client(&s.url, &["status"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not implemented"),
        "{}",
        text(&out.stderr)
    );
    // …and inference is not on the control address.
    assert!(client(&s.url, &["models"]).status.success());
    assert!(!client(&control_url, &["models"]).status.success());
}

#[test]
fn config_check_validates_without_starting_and_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let cfg = dir.path().join("swapd.toml");
    std::fs::write(
        &cfg,
        "models_root = \".\"\nlisten = \"127.0.0.1:7\"\nmetrics_listen = \"127.0.0.1:9464\"\nshutdown_grace_secs = 10\n",
    )
    .unwrap();
    let check = |envs: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["config", "check"]).arg(&cfg);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let out = check(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(
        o.contains("ok")
            && o.contains("tiny-llm, tiny-bert")
            && o.contains("http://127.0.0.1:9464/metrics"),
        "{o}"
    );

    // Several problems in the file: each named with the file and its key.
    std::fs::write(
        &cfg,
        "models_root = \".\"\nlisten = \"nowhere\"\nmax_concurrent = 0\nshutdown_grace_secs = -1\nlog_level = \"info,=[\"\n",
    )
    .unwrap();
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    for key in [
        "listen",
        "max_concurrent",
        "shutdown_grace_secs",
        "log_level",
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains("swapd.toml") && l.contains(&format!(": {key}: "))),
            "{key} not named with the file:\n{err}"
        );
    }
    assert!(err.contains("4 problem(s)"), "{err}");

    // The environment overrides the file, and its errors name the variable.
    std::fs::write(&cfg, "models_root = \".\"\n").unwrap();
    let out = check(&[("SWAPD_DEVICE", "tpu")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("SWAPD_DEVICE"),
        "{}",
        text(&out.stderr)
    );

    // A manifest error names the manifest.
    std::fs::write(dir.path().join("models.toml"), "[[model]]\nname = 3\n").unwrap();
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("models.toml"),
        "{}",
        text(&out.stderr)
    );
}
