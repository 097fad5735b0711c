//! After a swap and drain, the old version's memory really goes back to the OS. Alone in its
//! own test binary: RSS is per process, so no other test may allocate meanwhile.
mod common;

use common::*;
use swapd::proto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_returns_to_one_version_after_each_real_model_reload() {
    let mut config = real_config();
    config.admin_token = Some(TOKEN.into());
    config
        .manifest
        .models
        .retain(|m| m.kind == swapd::model::ModelKind::Llm);
    let server = TestServer::start(config).await;
    let llm = "smollm2-135m-instruct";
    let weights = server
        .registry
        .slot(llm)
        .unwrap()
        .active()
        .unwrap()
        .weight_bytes as i64;
    let mut client = server.client().await;
    // Warm up: the first requests allocate caches that stay.
    collect(&mut client, greedy(llm, "Hello", 4)).await.unwrap();
    let steady = swapd::memory::rss_bytes() as i64;
    for n in 0..3 {
        let (phases, result) = reload(
            &server,
            proto::ReloadRequest {
                model: llm.into(),
                ..Default::default()
            },
        )
        .await;
        assert!(result.committed, "{}", result.error);
        assert!(
            result.previous_freed,
            "reload {n}: old version still referenced"
        );
        let free = phases
            .iter()
            .find(|p| p.phase() == proto::Phase::Free && p.state() == proto::PhaseState::Done)
            .unwrap();
        let now = swapd::memory::rss_bytes() as i64;
        eprintln!(
            "reload {n}: steady RSS {steady}, after {now}, released {} (one version: {weights})",
            free.bytes_released
        );
        assert!(
            (now - steady).abs() < weights / 10,
            "reload {n}: RSS {now} is not within 10% of one version ({weights}) of the steady {steady}"
        );
        assert!(
            free.bytes_released > weights / 2,
            "reload {n}: only {} bytes came back",
            free.bytes_released
        );
    }
}
