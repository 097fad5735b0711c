//! Where a version's files come from: a path inside the models root, or an
//! `hf://owner/repo[@revision]/path` URI resolved through hf-hub's standard cache.
use std::path::{Path, PathBuf};

use super::error::ModelError;
use super::kind::ModelKind;

/// Files an embedding model directory must hold.
pub const EMBEDDING_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

/// A parsed model source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file (LLM) or directory (embedding model), relative to the models root or absolute.
    Local(PathBuf),
    /// A file or folder of a Hugging Face model repository.
    Hf {
        repo: String,
        revision: Option<String>,
        path: String,
    },
}

impl Source {
    /// Parses `hf://owner/repo[@revision][/path]` or a plain path.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty source".into());
        }
        let Some(rest) = s.strip_prefix("hf://") else {
            return Ok(Source::Local(PathBuf::from(s)));
        };
        let mut parts = rest.splitn(3, '/');
        let owner = parts.next().unwrap_or_default();
        let repo_rev = parts.next().unwrap_or_default();
        let path = parts
            .next()
            .unwrap_or_default()
            .trim_matches('/')
            .to_string();
        let (name, revision) = match repo_rev.split_once('@') {
            Some((n, r)) if !r.is_empty() => (n, Some(r.to_string())),
            Some(_) => return Err(format!("`{s}`: empty revision after `@`")),
            None => (repo_rev, None),
        };
        if owner.is_empty() || name.is_empty() {
            return Err(format!("`{s}`: expected hf://owner/repo[@revision]/path"));
        }
        // Each part becomes a path component of the cache (models--OWNER--REPO/snapshots/
        // REVISION/PATH): nothing in it may climb out or name something else.
        let plain = |part: &str| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        for (what, part) in [("owner", owner), ("repository", name)]
            .into_iter()
            .chain(revision.as_deref().map(|r| ("revision", r)))
        {
            if !plain(part) {
                return Err(format!(
                    "`{s}`: {what} `{part}` must be letters, digits, `-`, `_` and `.` (and not `.` or `..`)"
                ));
            }
        }
        if path
            .split('/')
            .any(|p| p == ".." || p == "." || p.is_empty() && !path.is_empty())
            || path.contains('\\')
        {
            return Err(format!(
                "`{s}`: `.`, `..`, empty parts and backslashes are not allowed in a repository path"
            ));
        }
        Ok(Source::Hf {
            repo: format!("{owner}/{name}"),
            revision,
            path,
        })
    }
}

/// Resolves sources to local files.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// Canonical models root; local sources must resolve inside it.
    pub root: PathBuf,
    /// Hugging Face cache directory; `None` uses hf-hub's default (`HF_HUB_CACHE`, `HF_HOME`).
    pub hf_cache: Option<PathBuf>,
    /// Resolve `hf://` sources from the cache only, never over the network.
    pub hf_offline: bool,
}

impl Resolver {
    /// The `(name, path)` of every file the version consists of: the GGUF file of an LLM, or
    /// the [`EMBEDDING_FILES`] of an embedding model.
    pub async fn resolve(
        &self,
        model: &str,
        kind: ModelKind,
        source: &str,
    ) -> Result<Vec<(String, PathBuf)>, ModelError> {
        let src_err = |reason: String| ModelError::Source {
            model: model.to_string(),
            source_uri: source.to_string(),
            reason,
        };
        match Source::parse(source).map_err(src_err)? {
            Source::Local(p) => self.resolve_local(model, kind, &p),
            Source::Hf {
                repo,
                revision,
                path,
            } => {
                let names: Vec<String> = match kind {
                    ModelKind::Llm if path.is_empty() => {
                        return Err(src_err("an LLM source must name the .gguf file".into()))
                    }
                    ModelKind::Llm => vec![path.clone()],
                    ModelKind::Embedding => EMBEDDING_FILES
                        .iter()
                        .map(|f| {
                            if path.is_empty() {
                                f.to_string()
                            } else {
                                format!("{path}/{f}")
                            }
                        })
                        .collect(),
                };
                let mut out = Vec::new();
                for name in names {
                    let local = self
                        .hf_file(&repo, revision.as_deref(), &name)
                        .await
                        .and_then(|p| inside_repo_cache(&p, &repo))
                        .map_err(|e| src_err(format!("{name}: {e}")))?;
                    let base = name.rsplit('/').next().unwrap_or(&name).to_string();
                    out.push((base, local));
                }
                Ok(out)
            }
        }
    }

    fn resolve_local(
        &self,
        model: &str,
        kind: ModelKind,
        p: &Path,
    ) -> Result<Vec<(String, PathBuf)>, ModelError> {
        let joined = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        };
        let canonical = joined.canonicalize().map_err(|_| ModelError::Missing {
            model: model.to_string(),
            path: joined.clone(),
        })?;
        if !canonical.starts_with(&self.root) {
            return Err(ModelError::OutsideRoot {
                model: model.to_string(),
                path: canonical,
                root: self.root.clone(),
            });
        }
        match kind {
            ModelKind::Llm if canonical.is_dir() => Err(ModelError::Source {
                model: model.to_string(),
                source_uri: p.display().to_string(),
                reason: "is a directory: an LLM source must name its .gguf file".into(),
            }),
            ModelKind::Llm => {
                let name = canonical
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok(vec![(name, canonical)])
            }
            ModelKind::Embedding => {
                if !canonical.is_dir() {
                    return Err(ModelError::Source {
                        model: model.to_string(),
                        source_uri: p.display().to_string(),
                        reason: "an embedding model source must be a directory".into(),
                    });
                }
                Ok(EMBEDDING_FILES
                    .iter()
                    .map(|f| (f.to_string(), canonical.join(f)))
                    .collect())
            }
        }
    }

    /// The local path of `file` at `revision` of `repo` in the Hugging Face cache (the layout
    /// the hub leaves: `models--OWNER--REPO/refs/REV` names a commit, whose
    /// `snapshots/COMMIT/` holds links into `blobs/`). A revision that is a commit is looked
    /// up directly. The default build never touches the network: a model server that
    /// downloads weights at reload time fails in ways a staged, pinned cache does not. With the
    /// `hf-online` feature and `hf_offline = false`, a file missing from the cache is
    /// downloaded into it through hf-hub's client.
    async fn hf_file(
        &self,
        repo: &str,
        revision: Option<&str>,
        file: &str,
    ) -> Result<PathBuf, String> {
        let cache = match (&self.hf_cache, std::env::var_os("HF_HUB_CACHE")) {
            (Some(dir), _) => hf_hub::Cache::new(dir.clone()),
            (None, Some(dir)) => hf_hub::Cache::new(dir.into()),
            (None, None) => hf_hub::Cache::from_env(),
        };
        let rev = revision.unwrap_or("main").to_string();
        let cached = hf_hub::Repo::with_revision(repo.to_string(), hf_hub::RepoType::Model, rev);
        let found = cache.repo(cached.clone()).get(file).or_else(|| {
            // `refs/` names branches and tags; a commit is its own snapshot folder.
            let snapshot = cache
                .path()
                .join(cached.folder_name())
                .join("snapshots")
                .join(revision?)
                .join(file);
            snapshot.exists().then_some(snapshot)
        });
        if let Some(path) = found {
            return Ok(path);
        }
        if self.hf_offline {
            return Err(format!(
                "not in the Hugging Face cache {} (offline mode)",
                cache.path().display()
            ));
        }
        download(cache, cached, file).await
    }
}

#[cfg(feature = "hf-online")]
async fn download(cache: hf_hub::Cache, repo: hf_hub::Repo, file: &str) -> Result<PathBuf, String> {
    let file = file.to_string();
    tokio::task::spawn_blocking(move || {
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
            .with_progress(false)
            .build()
            .map_err(|e| e.to_string())?;
        api.repo(repo).get(&file).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(not(feature = "hf-online"))]
async fn download(cache: hf_hub::Cache, _: hf_hub::Repo, _: &str) -> Result<PathBuf, String> {
    Err(format!(
        "not in the Hugging Face cache {}, and this build does not download (stage the file into the cache, or build with `--features hf-online`)",
        cache.path().display()
    ))
}

/// The cached file `local` of `repo`, checked to lie (links followed) inside that repository's
/// folder of the cache (`models--OWNER--REPO`): a snapshot's links point into its `blobs`,
/// and one that points anywhere else is refused rather than followed.
fn inside_repo_cache(local: &Path, repo: &str) -> Result<PathBuf, String> {
    let folder = format!("models--{}", repo.replace('/', "--"));
    let repo_dir = local
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == folder.as_str()))
        .ok_or_else(|| {
            format!(
                "{} is not inside a `{folder}` cache folder",
                local.display()
            )
        })?;
    let canonical_dir = repo_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", repo_dir.display()))?;
    let canonical = local
        .canonicalize()
        .map_err(|e| format!("{}: {e}", local.display()))?;
    if !canonical.starts_with(&canonical_dir) {
        return Err(format!(
            "{} links to {}, outside the cache's {} folder; refusing to follow it",
            local.display(),
            canonical.display(),
            canonical_dir.display()
        ));
    }
    // The snapshot path itself, not the blob: a version's files are named as in the
    // repository (an embedding model's loader finds its siblings beside it).
    Ok(local.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hf_uris_and_paths() {
        assert_eq!(
            Source::parse("hf://HuggingFaceTB/SmolLM2@abc123/q/m.gguf").unwrap(),
            Source::Hf {
                repo: "HuggingFaceTB/SmolLM2".into(),
                revision: Some("abc123".into()),
                path: "q/m.gguf".into()
            }
        );
        assert_eq!(
            Source::parse("hf://sentence-transformers/all-MiniLM-L6-v2").unwrap(),
            Source::Hf {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: None,
                path: String::new()
            }
        );
        assert_eq!(
            Source::parse("a/b.gguf").unwrap(),
            Source::Local("a/b.gguf".into())
        );
        for bad in [
            "",
            "hf://",
            "hf://owner",
            "hf://o/r@/x",
            "hf://o/r/../x",
            "hf://../r/x",
            "hf://o/../x",
            "hf://o/r@../x",
            "hf://o/r@..",
            "hf://./r/x",
            "hf://o/r/./x",
            "hf://o/r/a//b",
            "hf://o/r/a\\b",
            "hf://o w/r/x",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn local_paths_must_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(dir.path().join("outside.gguf"), b"x").unwrap();
        std::fs::write(root.join("inside.gguf"), b"x").unwrap();
        let r = Resolver {
            root: root.canonicalize().unwrap(),
            hf_cache: None,
            hf_offline: true,
        };
        assert!(r.resolve("m", ModelKind::Llm, "inside.gguf").await.is_ok());
        let e = r
            .resolve("m", ModelKind::Llm, "../outside.gguf")
            .await
            .unwrap_err();
        assert!(matches!(e, ModelError::OutsideRoot { .. }), "{e}");
        let e = r
            .resolve("m", ModelKind::Llm, "nope.gguf")
            .await
            .unwrap_err();
        assert!(matches!(e, ModelError::Missing { .. }), "{e}");
    }
}
