//! A bad model file or config at startup is a clear error, never a panic or a half-started
//! server.
mod common;

use std::path::Path;

use candle_core::quantized::gguf_file;
use common::*;
use swapd::config::Config;
use swapd::server::Server;

async fn start_err(config: Config) -> String {
    match Server::start(config).await {
        Ok(_) => panic!("server started"),
        Err(e) => e.to_string(),
    }
}

fn gguf_path(dir: &Path) -> std::path::PathBuf {
    dir.join("tiny-llm").join("tiny.gguf")
}

/// Pins the current content of the tiny GGUF, so only the content itself is at fault.
fn repin_llm(config: &mut Config, dir: &Path) {
    let digest = sha(&gguf_path(dir));
    config.manifest.models[0]
        .sha256
        .insert("tiny.gguf".into(), digest);
}

#[tokio::test]
async fn a_missing_model_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    std::fs::remove_file(gguf_path(dir.path())).unwrap();
    let e = start_err(config).await;
    assert!(
        e.contains("tiny-llm") && e.contains("tiny.gguf") && e.contains("not found"),
        "{e}"
    );
}

#[tokio::test]
async fn a_checksum_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let mut bytes = std::fs::read(gguf_path(dir.path())).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(gguf_path(dir.path()), bytes).unwrap();
    let e = start_err(config).await;
    assert!(
        e.contains("sha256 mismatch") && e.contains("expected"),
        "{e}"
    );
}

#[tokio::test]
async fn a_truncated_gguf_is_refused_even_with_a_matching_digest() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    let bytes = std::fs::read(gguf_path(dir.path())).unwrap();
    std::fs::write(gguf_path(dir.path()), &bytes[..bytes.len() * 2 / 3]).unwrap();
    repin_llm(&mut config, dir.path());
    let e = start_err(config).await;
    assert!(
        e.contains("not a valid GGUF") && e.contains("truncated"),
        "{e}"
    );
}

#[tokio::test]
async fn a_file_that_is_not_gguf_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    std::fs::write(gguf_path(dir.path()), b"<html>404 not found</html>").unwrap();
    repin_llm(&mut config, dir.path());
    let e = start_err(config).await;
    assert!(e.contains("not a valid GGUF"), "{e}");
}

#[tokio::test]
async fn a_gguf_without_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    let path = gguf_path(dir.path());
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let tensors: Vec<(String, candle_core::quantized::QTensor)> = ct
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                ct.tensor(&mut f, n, &candle_core::Device::Cpu).unwrap(),
            )
        })
        .collect();
    let metadata: Vec<(&str, &gguf_file::Value)> = ct
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("tokenizer."))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensor_refs: Vec<(&str, &candle_core::quantized::QTensor)> =
        tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    drop(f);
    let mut out = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut out, &metadata, &tensor_refs).unwrap();
    drop(out);
    repin_llm(&mut config, dir.path());
    let e = start_err(config).await;
    assert!(
        e.contains("tokenizer") && e.contains("tokenizer.ggml"),
        "{e}"
    );
}

#[tokio::test]
async fn an_embedding_model_without_a_usable_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    let tok = dir.path().join("tiny-bert").join("tokenizer.json");
    std::fs::remove_file(&tok).unwrap();
    let e = start_err(config.clone()).await;
    assert!(
        e.contains("tokenizer.json") && e.contains("not found"),
        "{e}"
    );
    std::fs::write(&tok, b"{ not json").unwrap();
    config.manifest.models[1]
        .sha256
        .insert("tokenizer.json".into(), sha(&tok));
    let e = start_err(config).await;
    assert!(e.contains("model `tiny-bert`: tokenizer"), "{e}");
}

#[tokio::test]
async fn a_model_path_outside_the_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut config = tiny_config(&root);
    std::fs::rename(gguf_path(&root), dir.path().join("tiny.gguf")).unwrap();
    config.manifest.models[0].source = "../tiny.gguf".into();
    let e = start_err(config).await;
    assert!(e.contains("outside the models root"), "{e}");
}

#[tokio::test]
async fn a_model_that_fails_its_preflight_checks_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    // Random weights cannot know this.
    config.manifest.models[0]
        .preflight
        .golden
        .push(swapd::manifest::Golden {
            prompt: "The capital of France is".into(),
            contains: Some("Paris".into()),
            token_prefix: Vec::new(),
        });
    let e = start_err(config).await;
    assert!(
        e.contains("tiny-llm") && e.contains("pre-flight check `golden` failed"),
        "{e}"
    );
}
