//! Protobuf ⇄ domain conversions, with the range checks that do not depend on a model.
use std::time::UNIX_EPOCH;

use crate::engine::{self, FinishReason, PromptInput, SamplingRequest};
use crate::error::Error;
use crate::model::chat::ChatMessage;
use crate::model::{LoadedModel, ModelVersion};
use crate::proto;

/// Most stop strings per request, and the longest one in bytes.
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
/// Chat roles the templates know.
const CHAT_ROLES: [&str; 3] = ["system", "user", "assistant"];

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// The model name field, required.
pub fn model_name(name: &str) -> Result<String, Error> {
    if name.trim().is_empty() {
        return Err(invalid("`model` is required"));
    }
    Ok(name.to_string())
}

fn chat(c: proto::Chat) -> Result<PromptInput, Error> {
    if c.messages.is_empty() {
        return Err(invalid("`chat.messages` is empty"));
    }
    let messages = c
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !CHAT_ROLES.contains(&m.role.as_str()) {
                return Err(invalid(format!(
                    "chat.messages[{i}].role `{}`: expected one of {}",
                    m.role,
                    CHAT_ROLES.join(", ")
                )));
            }
            Ok(ChatMessage {
                role: m.role,
                content: m.content,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(PromptInput::Chat(messages))
}

/// The prompt of a Generate or Tokenize request.
pub fn prompt_input(prompt: Option<proto::generate_request::Input>) -> Result<PromptInput, Error> {
    use proto::generate_request::Input;
    match prompt {
        None => Err(invalid("either `prompt` or `chat` is required")),
        Some(Input::Prompt(p)) if p.is_empty() => Err(invalid("`prompt` is empty")),
        Some(Input::Prompt(p)) => Ok(PromptInput::Raw(p)),
        Some(Input::Chat(c)) => chat(c),
    }
}

/// Same as [`prompt_input`] for the Tokenize request's oneof.
pub fn tokenize_input(input: Option<proto::tokenize_request::Input>) -> Result<PromptInput, Error> {
    use proto::generate_request::Input as G;
    use proto::tokenize_request::Input as T;
    prompt_input(input.map(|i| match i {
        T::Prompt(p) => G::Prompt(p),
        T::Chat(c) => G::Chat(c),
    }))
}

fn sampling(s: Option<proto::SamplingParams>) -> Result<SamplingRequest, Error> {
    let s = s.unwrap_or_default();
    if let Some(t) = s.temperature {
        crate::model::sampling::check_temperature(t).map_err(invalid)?;
    }
    if let Some(p) = s.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid(format!("top_p {p}: must be in (0, 1]")));
        }
    }
    if let Some(r) = s.repetition_penalty {
        crate::model::sampling::check_repetition_penalty(r).map_err(invalid)?;
    }
    if s.stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(format!(
            "{} stop strings: at most {MAX_STOP_STRINGS}",
            s.stop.len()
        )));
    }
    if let Some(bad) = s
        .stop
        .iter()
        .find(|x| x.is_empty() || x.len() > MAX_STOP_BYTES)
    {
        return Err(invalid(format!(
            "stop string of {} bytes: must be 1..={MAX_STOP_BYTES}",
            bad.len()
        )));
    }
    Ok(SamplingRequest {
        max_tokens: s.max_tokens,
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        repetition_penalty: s.repetition_penalty,
        repetition_last_n: s.repetition_last_n,
        seed: s.seed,
        stop: s.stop,
        ignore_eos: s.ignore_eos,
    })
}

impl TryFrom<proto::GenerateRequest> for engine::GenerateRequest {
    type Error = Error;
    fn try_from(r: proto::GenerateRequest) -> Result<Self, Error> {
        Ok(Self {
            model: model_name(&r.model)?,
            input: prompt_input(r.input)?,
            sampling: sampling(r.sampling)?,
            return_token_ids: r.return_token_ids,
        })
    }
}

/// The version reference every response carries.
pub fn version_ref(v: &ModelVersion) -> proto::VersionRef {
    proto::VersionRef {
        model: v.name.clone(),
        version: v.version.clone(),
        generation: v.generation(),
    }
}

pub fn finish_reason(r: FinishReason) -> proto::FinishReason {
    match r {
        FinishReason::Length => proto::FinishReason::Length,
        FinishReason::Stop => proto::FinishReason::Stop,
        FinishReason::Eos => proto::FinishReason::Eos,
    }
}

pub fn finished(f: engine::Finish) -> proto::Finished {
    proto::Finished {
        reason: finish_reason(f.reason) as i32,
        prompt_tokens: f.prompt_tokens as u32,
        completion_tokens: f.completion_tokens as u32,
        time_to_first_token_ms: f.time_to_first_token.as_secs_f64() * 1e3,
        tokens_per_second: f.tokens_per_second,
        seed: f.seed,
        stop: f.stop.unwrap_or_default(),
    }
}

/// Model info for ListModels / GetModel.
pub fn model_info(v: &ModelVersion) -> proto::ModelInfo {
    let (kind, dimension, vocab) = match &v.model {
        LoadedModel::Llm(m) => (proto::ModelKind::Llm, 0, m.tokenizer.vocab_size()),
        LoadedModel::Embedding(m) => (proto::ModelKind::Embedding, m.dimension, m.vocab_size),
    };
    proto::ModelInfo {
        name: v.name.clone(),
        kind: kind as i32,
        version: Some(version_ref(v)),
        device: v.device(),
        context_length: v.context_length() as u32,
        weight_bytes: v.weight_bytes,
        source: v.source.clone(),
        files: v
            .files
            .iter()
            .map(|f| proto::FileDigest {
                path: f.name.clone(),
                sha256: f.sha256.clone(),
                bytes: f.bytes,
            })
            .collect(),
        loaded_at_unix_ms: v
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default(),
        dimension: dimension as u32,
        vocab_size: vocab as u32,
        in_flight: v.in_flight() as u32,
    }
}
