//! After a swap and drain, the old version's memory really goes back to the OS (or, with
//! `SWAPD_TEST_DEVICE=cuda`, to the GPU). Alone in its own test binary: RSS is per process
//! (and device memory per device), so no other test may allocate meanwhile.
mod common;

use common::*;
use swapd::proto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_to_one_version_after_each_real_model_reload() {
    let mut config = real_config();
    config.admin_token = Some(TOKEN.into());
    config
        .manifest
        .models
        .retain(|m| m.kind == swapd::model::ModelKind::Llm);
    let server = TestServer::start(config).await;
    // The same measure the server's free phase uses: RSS on the CPU, device memory in use
    // on a GPU.
    let (device, _) = swapd::device::open(test_device().parse().unwrap()).unwrap();
    let used = || device.memory().used_bytes() as i64;
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
    let steady = used();
    for n in 0..3 {
        let (phases, result) = reload(
            &server,
            proto::ReloadRequest {
                model: llm.into(),
                // The same files each time: forced, or it is refused as already active.
                force: true,
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
        let now = used();
        eprintln!(
            "reload {n}: {}: {}; steady {steady}, after {now}, released {} (one version: {weights})",
            device.label(),
            free.detail,
            free.bytes_released
        );
        assert!(
            free.detail.contains(&format!("{}: ", device.label()))
                && free.detail.contains("bytes free"),
            "reload {n}: the free phase does not report the device's memory: {}",
            free.detail
        );
        assert!(
            (now - steady).abs() < weights / 10,
            "reload {n}: memory in use {now} is not within 10% of one version ({weights}) of the steady {steady}"
        );
        assert!(
            free.bytes_released > weights / 2,
            "reload {n}: only {} bytes came back",
            free.bytes_released
        );
    }
}
