//! Pre-flight checks: real inference on a freshly loaded version before it may serve.
use std::time::Instant;

use crate::manifest::PreflightSpec;

use super::{LoadedModel, ModelVersion};

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
    pub elapsed_ms: f64,
}

fn check(name: &str, started: Instant, result: Result<String, String>) -> CheckResult {
    let (passed, detail) = match result {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    CheckResult {
        name: name.to_string(),
        passed,
        detail,
        elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
    }
}

/// Runs every check on `new`, comparing with `serving` when there is one. Blocking. Stops at
/// the first failure (later checks would only repeat it). `on_check` sees each result.
pub fn run(
    new: &ModelVersion,
    serving: Option<&ModelVersion>,
    spec: &PreflightSpec,
    on_check: &mut dyn FnMut(&CheckResult),
) -> Vec<CheckResult> {
    let mut results = Vec::new();
    let mut push = |r: CheckResult, results: &mut Vec<CheckResult>| {
        on_check(&r);
        let ok = r.passed;
        results.push(r);
        ok
    };
    let t = Instant::now();
    if !push(
        check("compatibility", t, compatibility(new, serving)),
        &mut results,
    ) {
        return results;
    }
    match &new.model {
        LoadedModel::Llm(llm) => {
            let t = Instant::now();
            let probe = "Hello, world! 123 — ünïcödé";
            let r = llm.tokenizer.encode(probe).and_then(|ids| {
                let back = llm.tokenizer.decode(&ids);
                // A SentencePiece vocabulary with `add_space_prefix` puts a space before
                // the text; it is the encoder's, not the text's.
                let back = match llm.tokenizer.adds_space_prefix() {
                    true => back.strip_prefix(' ').unwrap_or(&back),
                    false => &back,
                };
                if back == probe {
                    Ok(format!("{} tokens round-trip", ids.len()))
                } else {
                    Err(format!("{probe:?} decodes back as {back:?}"))
                }
            });
            if !push(check("tokenizer_roundtrip", t, r), &mut results) {
                return results;
            }
            let t = Instant::now();
            let r = llm
                .tokenizer
                .encode("The")
                .and_then(|ids| llm.next_logits(&ids).map_err(|e| e.to_string()))
                .and_then(
                    |logits| match logits.iter().filter(|x| !x.is_finite()).count() {
                        0 => Ok(format!("{} logits, all finite", logits.len())),
                        n => Err(format!("{n} of {} logits are not finite", logits.len())),
                    },
                );
            if !push(check("finite_logits", t, r), &mut results) {
                return results;
            }
            for prompt in &spec.prompts {
                let t = Instant::now();
                let r = llm
                    .greedy_text(prompt, spec.max_tokens as usize)
                    .and_then(|(text, _)| {
                        let ms = t.elapsed().as_millis() as u64;
                        if text.trim().is_empty() {
                            Err(format!("{prompt:?} generated no text"))
                        } else if ms > spec.latency_budget_ms {
                            Err(format!(
                                "{prompt:?} took {ms} ms, budget {} ms",
                                spec.latency_budget_ms
                            ))
                        } else {
                            Ok(format!("{prompt:?} → {text:?} in {ms} ms"))
                        }
                    });
                if !push(check("generation", t, r), &mut results) {
                    return results;
                }
            }
            for g in &spec.golden {
                let t = Instant::now();
                let n = (g.token_prefix.len()).max(spec.max_tokens as usize).max(8);
                let r = llm.greedy_text(&g.prompt, n).and_then(|(text, ids)| {
                    if let Some(want) = &g.contains {
                        if !text.contains(want.as_str()) {
                            return Err(format!("{:?} → {text:?} lacks {want:?}", g.prompt));
                        }
                    }
                    if !ids.starts_with(&g.token_prefix) {
                        return Err(format!(
                            "{:?} → ids {:?} do not start with {:?}",
                            g.prompt, ids, g.token_prefix
                        ));
                    }
                    Ok(format!("{:?} → {text:?}", g.prompt))
                });
                if !push(check("golden", t, r), &mut results) {
                    return results;
                }
            }
        }
        LoadedModel::Embedding(m) => {
            let t = Instant::now();
            let r = m
                .embed(&spec.texts)
                .map_err(|e| e.to_string())
                .and_then(|out| {
                    for (text, e) in spec.texts.iter().zip(&out) {
                        if e.values.len() != m.dimension {
                            return Err(format!(
                                "{text:?}: {} values, expected {}",
                                e.values.len(),
                                m.dimension
                            ));
                        }
                        let norm = e.values.iter().map(|x| x * x).sum::<f32>().sqrt();
                        if !norm.is_finite() || (norm - 1.0).abs() > 1e-3 {
                            return Err(format!("{text:?}: norm {norm}, expected 1"));
                        }
                    }
                    Ok(format!(
                        "{} texts → finite unit vectors of dimension {}",
                        out.len(),
                        m.dimension
                    ))
                });
            if !push(check("embedding", t, r), &mut results) {
                return results;
            }
        }
    }
    results
}

/// Same kind as the serving version, same embedding dimension; a change of architecture or
/// vocabulary is reported but allowed.
fn compatibility(new: &ModelVersion, serving: Option<&ModelVersion>) -> Result<String, String> {
    let Some(old) = serving else {
        return Ok("no serving version".into());
    };
    if new.kind() != old.kind() {
        return Err(format!(
            "kind {} differs from the serving version's {}",
            new.kind().as_str(),
            old.kind().as_str()
        ));
    }
    match (&new.model, &old.model) {
        (LoadedModel::Embedding(a), LoadedModel::Embedding(b)) if a.dimension != b.dimension => {
            Err(format!(
                "embedding dimension {} differs from the serving version's {}",
                a.dimension, b.dimension
            ))
        }
        (LoadedModel::Llm(a), LoadedModel::Llm(b))
            if a.arch != b.arch || a.tokenizer.vocab_size() != b.tokenizer.vocab_size() =>
        {
            // Allowed: a stream stays on the version it started on, so nothing mixes.
            let mut changes = Vec::new();
            if a.arch != b.arch {
                changes.push(format!("architecture changed: {} → {}", b.arch, a.arch));
            }
            if a.tokenizer.vocab_size() != b.tokenizer.vocab_size() {
                changes.push(format!(
                    "vocabulary changed: {} → {} tokens",
                    b.tokenizer.vocab_size(),
                    a.tokenizer.vocab_size()
                ));
            }
            Ok(changes.join("; "))
        }
        _ => Ok(format!("same kind as version {}", old.version)),
    }
}
