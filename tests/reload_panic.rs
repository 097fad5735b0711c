//! A panic inside a reload (a bug) ends that reload as failed, like any other failure: the
//! caller gets a result and a status, the audit log a line, the metrics a count, and the
//! next reload runs. Alone in its binary: it arms a process-wide failpoint (debug builds).
mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_reload_phase_fails_that_reload_with_a_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.admin_token = Some(TOKEN.into());
    config.state_dir = Some(dir.path().join("state"));
    let server = TestServer::start(config).await;
    let slot = server.registry.slot("tiny-llm").unwrap();
    let v1 = slot.active().unwrap();
    for phase in ["admit", "preflight", "swap"] {
        std::env::set_var("SWAPD_FAILPOINT", format!("reload:{phase}"));
        let (_, r) = reload(&server, reload_to_tiny(dir.path(), 2, "")).await;
        assert!(!r.committed, "{phase}");
        assert!(
            r.error.contains(&format!("panicked in phase {phase}")),
            "{phase}: {}",
            r.error
        );
        assert_eq!(
            format!("{:?}", r.failed_phase()).to_lowercase(),
            phase,
            "{}",
            r.error
        );
        assert!(std::sync::Arc::ptr_eq(&slot.active().unwrap(), &v1));
        assert!(slot.state().reloading.is_none(), "still shown as reloading");
    }
    std::env::remove_var("SWAPD_FAILPOINT");
    let audit = std::fs::read_to_string(dir.path().join("state/audit.jsonl")).unwrap();
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("panicked in phase"))
            .count(),
        3,
        "{audit}"
    );
    let samples = scrape(server.metrics_addr).await;
    assert_eq!(
        value(
            &samples,
            "swapd_reload_total",
            &[("model", "tiny-llm"), ("result", "failed")]
        ),
        Some(3.0)
    );
    // The reload lock came back with each: the next one commits.
    let (_, r) = reload(&server, reload_to_tiny(dir.path(), 2, "")).await;
    assert!(r.committed, "{}", r.error);
}
