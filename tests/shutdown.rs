//! The `swapd serve` process under real signals: SIGTERM drains streams in flight within the
//! grace period and exits 0; past the grace period streams end with UNAVAILABLE; a second
//! signal exits at once. And no secret ever reaches the log.
mod common;

use std::process::Command;
use std::time::Duration;

use common::process::{Served, BIN};
use common::*;
use swapd::proto::inference_client::InferenceClient;

const LLM: &str = "smollm2-135m-instruct";

/// Each server its own state directory: tests run in parallel.
static NEXT_STATE_DIR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn real_args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--models-root".into(),
        repo_models().to_str().unwrap().into(),
        "--models".into(),
        LLM.into(),
        "--state-dir".into(),
        // Keep the repository's state directory out of it.
        std::env::temp_dir()
            .join(format!(
                "swapd-shutdown-{}-{}",
                std::process::id(),
                NEXT_STATE_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ))
            .to_str()
            .unwrap()
            .into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Starts `n` greedy streams of `tokens` tokens and returns once each has its first delta;
/// the handles yield each stream's outcome.
async fn streams_in_flight(
    url: &str,
    n: usize,
    tokens: u32,
) -> Vec<tokio::task::JoinHandle<Result<Collected, tonic::Status>>> {
    let mut handles = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(n);
    for i in 0..n {
        let url = url.to_string();
        let tx = tx.clone();
        handles.push(tokio::spawn(async move {
            let mut client = InferenceClient::connect(url).await.unwrap();
            let req = greedy(LLM, &format!("Story number {i}: Once upon a time"), tokens);
            let mut stream = client.generate(req).await?.into_inner();
            let mut out = Collected::default();
            let mut first = true;
            while let Some(msg) = stream.message().await? {
                if first {
                    first = false;
                    let _ = tx.send(()).await;
                }
                match msg.event {
                    Some(swapd::proto::generate_response::Event::Delta(d)) => {
                        out.text.push_str(&d.text)
                    }
                    Some(swapd::proto::generate_response::Event::Finished(f)) => {
                        out.finished = Some(f)
                    }
                    None => {}
                }
            }
            Ok(out)
        }));
    }
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("every stream started");
    }
    handles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_every_stream_then_exits_0() {
    let args = real_args(&["--shutdown-grace-secs", "120", "--max-concurrent", "4"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Served::start(&args, &[]);
    let handles = streams_in_flight(&p.url, 4, 300).await;
    // A connection opened before the signal, as a pooling client keeps one.
    let mut open = InferenceClient::connect(p.url.clone()).await.unwrap();
    open.list_models(swapd::proto::ListModelsRequest {})
        .await
        .expect("served before the signal");
    p.signal("TERM");
    p.wait_for_log("shutdown: health NOT_SERVING", Duration::from_secs(10));
    // No new request is accepted once the drain began: not on a new connection, and not on
    // the one already open.
    let on_new = async {
        let mut c = InferenceClient::connect(p.url.clone()).await?;
        c.list_models(swapd::proto::ListModelsRequest {})
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), on_new)
            .await
            .expect("a new call is answered or refused at once")
            .is_err(),
        "a new request on a new connection was served after SIGTERM"
    );
    let on_open = tokio::time::timeout(
        Duration::from_secs(10),
        open.list_models(swapd::proto::ListModelsRequest {}),
    )
    .await
    .expect("a call on the open connection is refused at once");
    assert_eq!(
        on_open.map(|_| ()).map_err(|e| e.code()),
        Err(tonic::Code::Unavailable),
        "a new request on an open connection was served after SIGTERM"
    );
    for h in handles {
        let out = h.await.unwrap().expect("the stream was not cut short");
        let f = out.finished.clone().expect("the stream finished");
        assert!(
            f.completion_tokens == 300 || f.reason == swapd::proto::FinishReason::Eos as i32,
            "{out:?}"
        );
    }
    let code = tokio::task::spawn_blocking(move || {
        let code = p.wait_exit(Duration::from_secs(30));
        (code, p.log_text())
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "{}", code.1);
    assert!(code.1.contains("drain clean"), "{}", code.1);
    // The four streams were still running when the signal came.
    assert!(code.1.contains("in_flight=4"), "{}", code.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_grace_period_streams_end_unavailable_and_the_exit_is_still_0() {
    let args = real_args(&["--shutdown-grace-secs", "0.5"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Served::start(&args, &[]);
    let handles = streams_in_flight(&p.url, 2, 1500).await;
    p.signal("TERM");
    for h in handles {
        let err = h
            .await
            .unwrap()
            .expect_err("cut at the end of the grace period");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(err.message().contains("shutting down"), "{err:?}");
    }
    let (code, log) = tokio::task::spawn_blocking(move || {
        let code = p.wait_exit(Duration::from_secs(30));
        (code, p.log_text())
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("drain not clean"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let args = real_args(&["--shutdown-grace-secs", "300"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = Served::start(&args, &[]);
    let _handles = streams_in_flight(&p.url, 1, 1500).await;
    p.signal("TERM");
    p.wait_for_log("a second signal exits at once", Duration::from_secs(10));
    p.signal("INT");
    let (code, log) = tokio::task::spawn_blocking(move || {
        let code = p.wait_exit(Duration::from_secs(10));
        (code, p.log_text())
    })
    .await
    .unwrap();
    assert_eq!(code, Some(130), "{log}");
}

#[test]
fn no_secret_reaches_the_log_even_at_trace_level() {
    let dir = tempfile::tempdir().unwrap();
    tiny_config(dir.path());
    let admin = "s3cr3t-admin-token-XYZ";
    let wrong = "wr0ng-guess-token-ABC";
    for format in ["text", "json"] {
        let mut p = Served::start(
            &[
                "--models-root",
                dir.path().to_str().unwrap(),
                "--log-format",
                format,
            ],
            &[("SWAPD_ADMIN_TOKEN", admin), ("RUST_LOG", "trace")],
        );
        let cli = |args: &[&str], token: &str| {
            Command::new(BIN)
                .args(args)
                .args(["--server", &p.url, "--token", token])
                .output()
                .unwrap()
        };
        assert!(cli(&["status"], admin).status.success());
        let out = cli(&["status"], wrong);
        assert!(!out.status.success());
        assert!(cli(&["reload", "tiny-llm", "--force"], admin)
            .status
            .success());
        let gen = Command::new(BIN)
            .args(["generate", "--server", &p.url, "--model", "tiny-llm", "hi"])
            .output()
            .unwrap();
        assert!(gen.status.success());
        p.signal("TERM");
        assert_eq!(p.wait_exit(Duration::from_secs(30)), Some(0));
        let log = p.log_text();
        assert!(log.contains("request finished"), "{log}");
        assert!(log.contains("request_id"), "{log}");
        for secret in [admin, wrong] {
            assert!(
                !log.contains(secret),
                "a secret reached the {format} log:\n{}",
                log.lines()
                    .filter(|l| l.contains(secret))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        // Bearer headers are not printed in any form.
        assert!(!log.to_lowercase().contains("bearer "), "{format} log");
    }
}
