//! What a model does, as the manifest names it.
/// What a model does: generate text or embed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A causal language model in a GGUF file.
    Llm,
    /// A sentence-embedding model in a Hugging Face directory.
    Embedding,
}

impl ModelKind {
    /// Lower-case name used in messages and the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Llm => "llm",
            ModelKind::Embedding => "embedding",
        }
    }
}
