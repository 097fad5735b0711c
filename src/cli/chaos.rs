//! `swapd bench chaos`: the careless and hostile clients of the soak (scripts/soak.sh), run
//! beside `swapd bench reload`'s well-behaved ones. Each round one of them:
//! - **cancels**: starts a long generation, reads a few messages, hangs up;
//! - **reads slowly**: a 16-byte HTTP/2 window and a deadline, sleeps past the deadline,
//!   then reads: it must get its buffered text and then DEADLINE_EXCEEDED, never a stream
//!   that ends OK without its summary;
//! - **sends a bad request** (a temperature of 1e-38, an empty prompt, max_tokens 0, an
//!   unknown model, a repetition penalty of 1e30): each must get its own code at once.
//!
//! Anything else (a wrong code, a hung call, a stream that ended without a summary or an
//! error) is an unexpected outcome: reported, and the command exits 1.
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tonic::transport::Endpoint;
use tonic::Code;

use super::client::Conn;
use crate::proto::{self, generate_request::Input, generate_response::Event};

#[derive(Debug, clap::Args)]
pub struct ChaosBench {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Concurrent chaos clients.
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Where to write the JSON report.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// Counts by kind of client and outcome.
#[derive(Debug, Default, Serialize)]
pub struct ChaosReport {
    pub duration_s: f64,
    pub cancels: u64,
    pub slow_readers: u64,
    pub bad_requests: u64,
    /// Outcomes other than the expected one, with how often each was seen.
    pub unexpected: BTreeMap<String, u64>,
}

const CALL_LIMIT: Duration = Duration::from_secs(60);

fn prompt(model: &str, text: &str, max_tokens: u32) -> proto::GenerateRequest {
    proto::GenerateRequest {
        model: model.into(),
        input: Some(Input::Prompt(text.into())),
        sampling: Some(proto::SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        return_token_ids: false,
    }
}

/// A generation that reads `read` messages, then hangs up.
async fn cancel(url: &str, model: &str, read: usize) -> Result<(), String> {
    let channel = connect(url, None).await?;
    let mut c = proto::inference_client::InferenceClient::new(channel);
    let mut s = c
        .generate(prompt(model, "Once upon a time", 200))
        .await
        .map_err(|e| format!("cancel: {:?}", e.code()))?
        .into_inner();
    for _ in 0..read {
        match s.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Err("cancel: ended before it was cancelled".into()),
            Err(e) if e.code() == Code::Unavailable => return Ok(()), // drained by a reload
            Err(e) => return Err(format!("cancel: {:?}", e.code())),
        }
    }
    Ok(())
}

/// A client that does not read until its deadline has passed, then reads everything.
async fn slow_reader(url: &str, model: &str) -> Result<(), String> {
    let channel = connect(url, Some(16)).await?;
    let mut c = proto::inference_client::InferenceClient::new(channel);
    let mut req = tonic::Request::new(prompt(model, "1, 2, 3, 4,", 400));
    req.set_timeout(Duration::from_millis(1500));
    let mut s = match c.generate(req).await {
        Ok(s) => s.into_inner(),
        // Its deadline can pass before the stream starts when the server is busy.
        Err(e) if e.code() == Code::DeadlineExceeded => return Ok(()),
        Err(e) => return Err(format!("slow reader: start {:?}", e.code())),
    };
    tokio::time::sleep(Duration::from_millis(2500)).await;
    loop {
        match s.message().await {
            Ok(Some(m)) => {
                if let Some(Event::Finished(_)) = m.event {
                    // It finished within its deadline after all: fine.
                    return Ok(());
                }
            }
            Ok(None) => return Err("slow reader: stream ended OK without a summary".into()),
            // The client's own deadline, or the server's: both are the expected end.
            Err(e) if e.code() == Code::DeadlineExceeded => return Ok(()),
            // Drained by a reload's cancel policy.
            Err(e) if e.code() == Code::Unavailable => return Ok(()),
            Err(e) => return Err(format!("slow reader: {:?}", e.code())),
        }
    }
}

/// One of the bad requests, by `n`, and the code it must get.
async fn bad_request(url: &str, model: &str, n: u64) -> Result<(), String> {
    let channel = connect(url, None).await?;
    let mut c = proto::inference_client::InferenceClient::new(channel);
    let mut req = prompt(model, "hello", 4);
    let s = req.sampling.as_mut().unwrap();
    let (what, want) = match n % 5 {
        0 => {
            s.temperature = Some(1e-38);
            ("tiny temperature", Code::InvalidArgument)
        }
        1 => {
            req.input = Some(Input::Prompt(String::new()));
            ("empty prompt", Code::InvalidArgument)
        }
        2 => {
            s.max_tokens = Some(0);
            ("max_tokens 0", Code::InvalidArgument)
        }
        3 => {
            req.model = "no-such-model".into();
            ("unknown model", Code::NotFound)
        }
        _ => {
            s.repetition_penalty = Some(1e30);
            ("huge repetition penalty", Code::InvalidArgument)
        }
    };
    let got = async {
        let mut st = c.generate(req).await?.into_inner();
        while st.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await;
    match got {
        Err(e) if e.code() == want => Ok(()),
        Err(e) => Err(format!("{what}: {:?}", e.code())),
        Ok(()) => Err(format!("{what}: accepted")),
    }
}

async fn connect(url: &str, window: Option<u32>) -> Result<tonic::transport::Channel, String> {
    let mut e = Endpoint::from_shared(url.to_string()).map_err(|e| e.to_string())?;
    if let Some(w) = window {
        e = e
            .initial_stream_window_size(w)
            .initial_connection_window_size(w);
    }
    e.connect().await.map_err(|e| format!("connect: {e}"))
}

/// Runs the chaos clients for the duration and reports.
pub async fn run(b: ChaosBench) -> Result<ExitCode> {
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(b.duration);
    let mut tasks = Vec::new();
    for client in 0..b.clients.max(1) {
        let (url, model) = (b.conn.server.clone(), b.model.clone());
        tasks.push(tokio::spawn(async move {
            let mut report = ChaosReport::default();
            let mut n = client as u64;
            while Instant::now() < until {
                let kind = n % 3;
                let r = tokio::time::timeout(CALL_LIMIT, async {
                    match kind {
                        0 => cancel(&url, &model, 1 + (n as usize / 3) % 4).await,
                        1 => slow_reader(&url, &model).await,
                        _ => bad_request(&url, &model, n / 3).await,
                    }
                })
                .await
                .unwrap_or_else(|_| Err(format!("kind {kind}: no answer in {CALL_LIMIT:?}")));
                match kind {
                    0 => report.cancels += 1,
                    1 => report.slow_readers += 1,
                    _ => report.bad_requests += 1,
                }
                if let Err(e) = r {
                    *report.unexpected.entry(e).or_default() += 1;
                }
                n += b.clients.max(1) as u64;
            }
            report
        }));
    }
    let mut total = ChaosReport::default();
    for t in tasks {
        let r = t.await?;
        total.cancels += r.cancels;
        total.slow_readers += r.slow_readers;
        total.bad_requests += r.bad_requests;
        for (k, v) in r.unexpected {
            *total.unexpected.entry(k).or_default() += v;
        }
    }
    total.duration_s = started.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&total)?;
    if let Some(out) = &b.out {
        std::fs::write(out, &json)?;
    }
    println!("{json}");
    Ok(if total.unexpected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
