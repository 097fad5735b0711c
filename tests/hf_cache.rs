//! `hf://` sources resolve through hf-hub against a local cache laid out the way the hub
//! leaves it (blobs, snapshots/<commit> symlinks, refs/main), with no network.
mod common;

use std::path::Path;

use common::*;
use swapd::proto;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Puts `files` (name → local file) into `cache` as revision COMMIT of `repo`, with
/// refs/main pointing at it.
fn add_to_cache(cache: &Path, repo: &str, files: &[(&str, &Path)]) {
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs").join("main"), COMMIT).unwrap();
    let snap = folder.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    for (name, src) in files {
        let digest = sha(src);
        std::fs::copy(src, folder.join("blobs").join(&digest)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{digest}"), snap.join(name)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_sources_resolve_from_the_local_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    let cache = dir.path().join("hub");
    let bert = dir.path().join("tiny-bert");
    add_to_cache(
        &cache,
        "tiny-org/tiny-llm-gguf",
        &[("tiny.gguf", &dir.path().join("tiny-llm/tiny.gguf"))],
    );
    add_to_cache(
        &cache,
        "tiny-org/tiny-bert",
        &[
            ("config.json", &bert.join("config.json")),
            ("model.safetensors", &bert.join("model.safetensors")),
            ("tokenizer.json", &bert.join("tokenizer.json")),
        ],
    );
    // The local copies go away: only the cache can serve them now.
    std::fs::remove_dir_all(dir.path().join("tiny-llm")).unwrap();
    std::fs::remove_dir_all(&bert).unwrap();
    config.manifest.models[0].source = "hf://tiny-org/tiny-llm-gguf/tiny.gguf".into();
    config.manifest.models[1].source = format!("hf://tiny-org/tiny-bert@{COMMIT}");
    config.hf_cache = Some(cache.clone());
    config.hf_offline = true;
    let server = TestServer::start(config.clone()).await;
    let mut client = server.client().await;
    let out = collect(&mut client, greedy("tiny-llm", "hello", 4))
        .await
        .unwrap();
    assert_eq!(
        out.finished.unwrap().completion_tokens as usize,
        out.ids.len()
    );
    let info = client
        .get_model(proto::GetModelRequest {
            model: "tiny-llm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.source, "hf://tiny-org/tiny-llm-gguf/tiny.gguf");
    let emb = client
        .embed(proto::EmbedRequest {
            model: "tiny-bert".into(),
            texts: vec!["hello".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(emb.embeddings.len(), 1);
    drop(server);

    // A file the cache does not hold is a clear error, not a network call.
    config.manifest.models[0].source = "hf://tiny-org/tiny-llm-gguf/other.gguf".into();
    config.manifest.models[0]
        .sha256
        .insert("other.gguf".into(), "0".repeat(64));
    let e = match swapd::server::Server::start(config).await {
        Ok(_) => panic!("started without the file"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("other.gguf") && e.contains("not in the Hugging Face cache"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_link_out_of_the_cache_is_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    let cache = dir.path().join("hub");
    let gguf = dir.path().join("tiny-llm/tiny.gguf");
    add_to_cache(&cache, "tiny-org/tiny-llm-gguf", &[("tiny.gguf", &gguf)]);
    // A second name in the snapshot links straight at a file outside the cache.
    let snap = cache.join(format!(
        "models--tiny-org--tiny-llm-gguf/snapshots/{COMMIT}"
    ));
    std::os::unix::fs::symlink(&gguf, snap.join("escape.gguf")).unwrap();
    config.manifest.models[0].source = "hf://tiny-org/tiny-llm-gguf/escape.gguf".into();
    config.manifest.models[0]
        .sha256
        .insert("escape.gguf".into(), sha(&gguf));
    config.hf_cache = Some(cache);
    config.hf_offline = true;
    let e = match swapd::server::Server::start(config).await {
        Ok(_) => panic!("followed a link out of the cache"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("outside the cache"), "{e}");
}
