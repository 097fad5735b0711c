//! Client commands: talk to a running swapd over gRPC. Errors are `anyhow` here: they end up
//! as one line on the operator's terminal.
use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::proto::inference_client::InferenceClient;
use crate::proto::{self, generate_request::Input, generate_response::Event};

/// Where the server is.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// Server URL.
    #[arg(long, env = "SWAPD_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Model name [default: the server's first LLM].
    #[arg(long)]
    pub model: Option<String>,
    /// Apply the model's chat template (the prompt is one user message).
    #[arg(long)]
    pub chat: bool,
    /// 0 is greedy: always the most likely next token, after the repetition penalty (add
    /// --repetition-penalty 1 for the plain argmax); otherwise between 0.01 and 100
    /// [default: the model's].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Divides the logits of recent tokens by this (1 disables it; between 0.01 and 100)
    /// [default: the model's].
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long)]
    pub max_tokens: Option<u32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Generate past end-of-sequence tokens, up to --max-tokens (fixed-length runs).
    #[arg(long)]
    pub ignore_eos: bool,
    pub prompt: String,
}

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Model name [default: the server's first embedding model].
    #[arg(long)]
    pub model: Option<String>,
    /// Print the whole response as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(required = true)]
    pub texts: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct SmokeArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// LLM to test [default: the server's first LLM].
    #[arg(long)]
    pub model: Option<String>,
    /// Embedding model to test [default: the server's first embedding model].
    #[arg(long)]
    pub embed_model: Option<String>,
}

pub(crate) async fn channel(conn: &Conn) -> Result<Channel> {
    Channel::from_shared(conn.server.clone())
        .with_context(|| format!("bad server URL `{}`", conn.server))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", conn.server))
}

/// The named model, or the server's first model of `kind`.
async fn pick_model(
    client: &mut InferenceClient<Channel>,
    name: Option<String>,
    kind: proto::ModelKind,
) -> Result<String> {
    if let Some(n) = name {
        return Ok(n);
    }
    let models = client
        .list_models(proto::ListModelsRequest {})
        .await
        .context("ListModels")?
        .into_inner()
        .models;
    models
        .into_iter()
        .find(|m| m.kind == kind as i32)
        .map(|m| m.name)
        .with_context(|| format!("the server serves no {kind:?} model"))
}

fn describe(v: &Option<proto::VersionRef>) -> String {
    match v {
        Some(v) => format!(
            "{} version {} (generation {})",
            v.model, v.version, v.generation
        ),
        None => "unknown version".into(),
    }
}

/// Result of one streamed generation.
struct Generated {
    text: String,
    version: Option<proto::VersionRef>,
    finished: Option<proto::Finished>,
}

async fn stream_generation(
    client: &mut InferenceClient<Channel>,
    req: proto::GenerateRequest,
    mut on_text: impl FnMut(&str),
) -> Result<Generated> {
    let mut stream = client.generate(req).await.context("Generate")?.into_inner();
    let mut out = Generated {
        text: String::new(),
        version: None,
        finished: None,
    };
    while let Some(msg) = stream.message().await.context("Generate stream")? {
        if out.version.is_none() {
            out.version = msg.version.clone();
        } else if out.version != msg.version {
            bail!(
                "the stream mixed versions: {:?} then {:?}",
                out.version,
                msg.version
            );
        }
        match msg.event {
            Some(Event::Delta(d)) => {
                on_text(&d.text);
                out.text.push_str(&d.text);
            }
            Some(Event::Finished(f)) => out.finished = Some(f),
            None => {}
        }
    }
    Ok(out)
}

pub async fn generate(a: GenerateArgs) -> Result<ExitCode> {
    let mut client = InferenceClient::new(channel(&a.conn).await?);
    let model = pick_model(&mut client, a.model, proto::ModelKind::Llm).await?;
    let input = if a.chat {
        Input::Chat(proto::Chat {
            messages: vec![proto::ChatMessage {
                role: "user".into(),
                content: a.prompt,
            }],
        })
    } else {
        Input::Prompt(a.prompt)
    };
    let req = proto::GenerateRequest {
        model,
        input: Some(input),
        sampling: Some(proto::SamplingParams {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            repetition_penalty: a.repetition_penalty,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
            stop: a.stop,
            ignore_eos: a.ignore_eos,
            ..Default::default()
        }),
        return_token_ids: false,
    };
    let mut stdout = std::io::stdout();
    let g = stream_generation(&mut client, req, |t| {
        let _ = stdout.write_all(t.as_bytes());
        let _ = stdout.flush();
    })
    .await?;
    println!();
    let f = g
        .finished
        .context("the stream ended without a finished message")?;
    eprintln!(
        "[{} | {:?} | prompt {} + completion {} tokens | first token {:.0} ms | {:.1} tokens/s | seed {}]",
        describe(&g.version),
        f.reason(),
        f.prompt_tokens,
        f.completion_tokens,
        f.time_to_first_token_ms,
        f.tokens_per_second,
        f.seed
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn embed(a: EmbedArgs) -> Result<ExitCode> {
    let mut client = InferenceClient::new(channel(&a.conn).await?);
    let model = pick_model(&mut client, a.model, proto::ModelKind::Embedding).await?;
    let resp = client
        .embed(proto::EmbedRequest {
            model,
            texts: a.texts.clone(),
        })
        .await
        .context("Embed")?
        .into_inner();
    if a.json {
        let v = serde_json::json!({
            "model": resp.version.as_ref().map(|v| &v.model),
            "version": resp.version.as_ref().map(|v| &v.version),
            "generation": resp.version.as_ref().map(|v| v.generation),
            "dimension": resp.dimension,
            "embeddings": resp.embeddings.iter().map(|e| serde_json::json!({
                "tokens": e.tokens, "truncated": e.truncated, "values": e.values,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        println!("{} | dimension {}", describe(&resp.version), resp.dimension);
        for (t, e) in a.texts.iter().zip(&resp.embeddings) {
            let head: Vec<String> = e.values.iter().take(4).map(|x| format!("{x:.4}")).collect();
            println!("{t:?}: {} tokens, [{}, …]", e.tokens, head.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn models(c: Conn) -> Result<ExitCode> {
    let mut client = InferenceClient::new(channel(&c).await?);
    let models = client
        .list_models(proto::ListModelsRequest {})
        .await
        .context("ListModels")?
        .into_inner()
        .models;
    println!(
        "{:<28} {:<10} {:<17} {:>4} {:<7} {:>8} {:>10} {:>9}",
        "MODEL", "KIND", "VERSION", "GEN", "DEVICE", "CONTEXT", "WEIGHTS", "IN-FLIGHT"
    );
    for m in models {
        let v = m.version.clone().unwrap_or_default();
        println!(
            "{:<28} {:<10} {:<17} {:>4} {:<7} {:>8} {:>8.1}MB {:>9}",
            m.name,
            match m.kind() {
                proto::ModelKind::Llm => "llm",
                proto::ModelKind::Embedding => "embedding",
                proto::ModelKind::Unspecified => "?",
            },
            v.version,
            v.generation,
            m.device,
            m.context_length,
            m.weight_bytes as f64 / 1e6,
            m.in_flight
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn smoke(a: SmokeArgs) -> Result<ExitCode> {
    let ch = channel(&a.conn).await?;
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        println!("{} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            failures.push(what);
        }
    };
    let health = HealthClient::new(ch.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .context("health check")?
        .into_inner();
    check(
        health.status == 1,
        format!("health: status {}", health.status),
    );

    let mut client = InferenceClient::new(ch);
    let llm = pick_model(&mut client, a.model, proto::ModelKind::Llm).await?;
    let req = proto::GenerateRequest {
        model: llm.clone(),
        input: Some(Input::Prompt("The capital of France is".into())),
        sampling: Some(proto::SamplingParams {
            max_tokens: Some(12),
            temperature: Some(0.0),
            ..Default::default()
        }),
        return_token_ids: false,
    };
    let g = stream_generation(&mut client, req, |_| {}).await?;
    check(
        !g.text.trim().is_empty(),
        format!("generate {llm}: {:?}", g.text),
    );
    check(
        g.version.as_ref().is_some_and(|v| !v.version.is_empty()),
        format!("generate names its version: {}", describe(&g.version)),
    );
    check(
        g.finished.as_ref().is_some_and(|f| f.completion_tokens > 0),
        format!(
            "generate finished: {:?}",
            g.finished
                .as_ref()
                .map(|f| (f.reason(), f.completion_tokens))
        ),
    );

    let emb = pick_model(&mut client, a.embed_model, proto::ModelKind::Embedding).await?;
    let resp = client
        .embed(proto::EmbedRequest {
            model: emb.clone(),
            texts: vec!["swapd smoke test".into(), "a second sentence".into()],
        })
        .await
        .context("Embed")?
        .into_inner();
    let sane = resp.embeddings.len() == 2
        && resp.embeddings.iter().all(|e| {
            let norm = e.values.iter().map(|x| x * x).sum::<f32>().sqrt();
            e.values.len() == resp.dimension as usize
                && resp.dimension > 0
                && e.values.iter().all(|x| x.is_finite())
                && (norm - 1.0).abs() < 1e-3
        });
    check(
        sane,
        format!(
            "embed {emb}: 2 finite unit vectors of dimension {}",
            resp.dimension
        ),
    );
    check(
        resp.version.as_ref().is_some_and(|v| !v.version.is_empty()),
        format!("embed names its version: {}", describe(&resp.version)),
    );
    if failures.is_empty() {
        println!("smoke: all checks passed");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("smoke: {} check(s) failed", failures.len());
        Ok(ExitCode::FAILURE)
    }
}
