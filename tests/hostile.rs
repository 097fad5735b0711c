//! Hostile and careless clients: each defect a reliability probe found, over real gRPC on
//! loopback against tiny generated models.
mod common;

use std::time::Duration;

use common::stall::*;
use common::*;
use swapd::proto;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_slot_at_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.limits.max_concurrent = 1;
    let server = TestServer::start(config).await;
    let stuck = stalled(&server, Some(Duration::from_secs(3))).await;
    until("the stalled stream runs", Duration::from_secs(20), || {
        running(&server) == 1
    })
    .await;
    // Its deadline ends it although it never reads: the slot comes back while it is still
    // connected.
    until(
        "the slot of a client past its deadline comes back",
        Duration::from_secs(30),
        || running(&server) == 0 && server.engine.admitted() == 0,
    )
    .await;
    let mut client = server.client().await;
    let out = collect(&mut client, greedy(LLM, "hello", 4)).await.unwrap();
    assert!(out.finished.is_some());
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_drain_ends_a_stalled_stream_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(with_token(dir.path())).await;
    let old = server.registry.slot(LLM).unwrap().active().unwrap();
    let weak = std::sync::Arc::downgrade(&old);
    drop(old);
    let stuck = stalled(&server, None).await;
    until("the stalled stream runs", Duration::from_secs(20), || {
        running(&server) == 1
    })
    .await;
    let mut req = reload_to_tiny(dir.path(), 2, "");
    req.drain_timeout_ms = Some(300);
    req.drain_policy = proto::DrainPolicy::Cancel as i32;
    let (_, r) = tokio::time::timeout(Duration::from_secs(30), reload(&server, req))
        .await
        .expect("the drain waited for a client that does not read");
    assert!(r.committed, "{}", r.error);
    assert_eq!(r.cancelled_requests, 1);
    assert!(
        r.previous_freed,
        "the straggler still holds the old version"
    );
    assert!(weak.upgrade().is_none());
    // A second reload is not refused as busy: the first one is over.
    let (_, r) = reload(&server, reload_to_tiny(dir.path(), 3, "")).await;
    assert!(r.committed, "{}", r.error);
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_callers_that_leave_give_their_places_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.limits.max_concurrent = 1;
    config.limits.max_queue = 4;
    let server = TestServer::start(config).await;
    let blocker = stalled(&server, None).await;
    // Its headers come back before it takes the slot: wait until it holds it.
    until("the blocker runs", Duration::from_secs(20), || {
        running(&server) == 1
    })
    .await;
    let mut queued = Vec::new();
    for _ in 0..4 {
        let mut client = server.client().await;
        queued.push(client.generate(long()).await.unwrap().into_inner());
    }
    assert_eq!(server.engine.admitted(), 5);
    let before = value(
        &scrape(server.metrics_addr).await,
        "swapd_generated_tokens_total",
        &[("model", LLM)],
    );
    drop(queued);
    until(
        "cancelled queue places come back",
        Duration::from_secs(10),
        || server.engine.admitted() == 1,
    )
    .await;
    // A new caller is queued, not refused as overloaded.
    let mut client = server.client().await;
    let waiting = client.generate(greedy(LLM, "hi", 2)).await.unwrap();
    drop(blocker);
    let mut s = waiting.into_inner();
    while s.message().await.unwrap().is_some() {}
    // The four that left generated nothing once the slot freed: only the blocker's tokens
    // and the last caller's two were counted.
    until("the blocker ends", Duration::from_secs(10), || {
        server.engine.admitted() == 0
    })
    .await;
    let after = value(
        &scrape(server.metrics_addr).await,
        "swapd_generated_tokens_total",
        &[("model", LLM)],
    )
    .unwrap();
    let blocker_tokens = after - before.unwrap_or(0.0) - 2.0;
    assert!(
        (0.0..=250.0).contains(&blocker_tokens),
        "{after} tokens after {before:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_and_queue_deadlines_never_count_against_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = with_token(dir.path());
    config.limits.max_concurrent = 1;
    config.auto_rollback = Some(swapd::registry::reload::AutoRollback {
        window: Duration::from_secs(120),
        min_requests: 5,
        max_error_rate: 0.5,
    });
    let server = TestServer::start(config).await;
    let mut req = reload_to_tiny(dir.path(), 2, "");
    req.keep_previous = true;
    let (_, r) = reload(&server, req).await;
    assert!(r.committed, "{}", r.error);
    let slot = server.registry.slot(LLM).unwrap();
    let new = slot.active().unwrap();
    let mut client = server.client().await;
    // Values so small that sampling would divide by ~0: INVALID_ARGUMENT, never INTERNAL.
    for (what, f) in [
        (
            "temperature",
            (|s: &mut proto::SamplingParams| s.temperature = Some(1e-38)) as fn(&mut _),
        ),
        ("temperature", |s| s.temperature = Some(0.001)),
        ("repetition_penalty", |s| s.repetition_penalty = Some(1e-38)),
        ("repetition_penalty", |s| s.repetition_penalty = Some(1e30)),
    ] {
        let mut req = greedy(LLM, "hello", 4);
        f(req.sampling.as_mut().unwrap());
        let e = collect(&mut client, req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(what), "{}", e.message());
    }
    // Overload: a stalled stream holds the only slot; callers' deadlines pass in the queue.
    let blocker = stalled(&server, None).await;
    until("the blocker runs", Duration::from_secs(20), || {
        running(&server) == 1
    })
    .await;
    for _ in 0..6 {
        let mut req = tonic::Request::new(greedy(LLM, "hello", 4));
        req.set_timeout(Duration::from_millis(200));
        let e = async {
            let mut s = client.generate(req).await?.into_inner();
            while s.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        }
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    }
    drop(blocker);
    assert_eq!(new.outcomes().1, 0, "failures counted against the version");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        std::sync::Arc::ptr_eq(&slot.active().unwrap(), &new),
        "rolled back: {:?}",
        slot.state().auto_rollback
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_the_active_version_is_refused_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(with_token(dir.path())).await;
    let mut req = reload_to_tiny(dir.path(), 2, "");
    req.keep_previous = true;
    let (_, r) = reload(&server, req.clone()).await;
    assert!(r.committed, "{}", r.error);
    let slot = server.registry.slot(LLM).unwrap();
    let standby = slot.standby().expect("a standby");
    let (_, r) = reload(&server, req.clone()).await;
    assert!(!r.committed);
    assert_eq!(r.failed_check, "already_active", "{}", r.error);
    assert!(r.error.contains("already active"), "{}", r.error);
    // The rollback target is untouched, and so is the cool-down: asking again is refused the
    // same way, not as a source that keeps failing.
    assert!(std::sync::Arc::ptr_eq(&slot.standby().unwrap(), &standby));
    for _ in 0..3 {
        let (_, r) = reload(&server, req.clone()).await;
        assert_eq!(r.failed_check, "already_active");
    }
    let (_, r) = rollback(&server, LLM).await;
    assert!(r.committed, "{}", r.error);
    assert_eq!(slot.active().unwrap().version, standby.version);
    // Forced, the same version loads again.
    let mut forced = req;
    forced.force = true;
    let (_, r) = reload(&server, forced.clone()).await;
    assert!(r.committed, "{}", r.error);
    let (_, r) = reload(&server, forced).await;
    assert!(r.committed, "{}", r.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cool_down_is_keyed_by_what_failed_and_never_by_wrong_pins() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(with_token(dir.path())).await;
    let good = reload_to_tiny(dir.path(), 2, "");
    // The request's own pins are wrong, four times: no cool-down, each one fails at verify.
    let mut wrong = good.clone();
    wrong.sha256 = [("v2.gguf".to_string(), "cd".repeat(32))].into();
    for _ in 0..4 {
        let (_, r) = reload(&server, wrong.clone()).await;
        assert_eq!(r.failed_phase(), proto::Phase::Verify, "{}", r.error);
    }
    // The same source with the right pins is not refused.
    let (_, r) = reload(&server, good).await;
    assert!(r.committed, "{}", r.error);
    // Files that fail their checks cool down: that source with those digests only.
    let bad = reload_to_tiny(dir.path(), 3, "-nan");
    for _ in 0..3 {
        let (_, r) = reload(&server, bad.clone()).await;
        assert_eq!(r.failed_check, "finite_weights", "{}", r.error);
    }
    let mut ctl = control(&server).await;
    let e = ctl.reload(bad.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("failed 3 reloads"), "{}", e.message());
    let mut forced = bad;
    forced.force = true;
    let (_, r) = reload(&server, forced).await;
    assert_eq!(r.failed_check, "finite_weights");
    let (_, r) = reload(&server, reload_to_tiny(dir.path(), 7, "")).await;
    assert!(r.committed, "{}", r.error);
}

#[test]
fn an_admin_token_of_whitespace_is_refused_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let cfg = dir.path().join("swapd.toml");
    for (token, ok) in [
        (" ", false),
        ("tok en", false),
        ("\\ttab", false),
        ("s3cr3t-XYZ", true),
    ] {
        std::fs::write(
            &cfg,
            format!("models_root = \".\"\nadmin_token = \"{token}\"\n"),
        )
        .unwrap();
        let out = std::process::Command::new(common::process::BIN)
            .args(["config", "check"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if ok {
            assert!(out.status.success(), "{token:?}: {err}");
            continue;
        }
        assert_eq!(out.status.code(), Some(2), "{token:?} accepted");
        assert!(
            err.contains("admin_token") && err.contains("whitespace"),
            "{err}"
        );
        assert!(
            !err.contains(&format!("\"{token}\"")),
            "the token was printed: {err}"
        );
    }
    // From the environment too, named by its variable.
    std::fs::write(&cfg, "models_root = \".\"\n").unwrap();
    let out = std::process::Command::new(common::process::BIN)
        .args(["config", "check"])
        .arg(&cfg)
        .env("SWAPD_ADMIN_TOKEN", " ")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SWAPD_ADMIN_TOKEN"));
}
