//! The domain error every request path returns; `service::status` is the one place it becomes
//! a gRPC status.
use crate::model::ModelError;

/// What went wrong with a request, with the context a caller needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No model of that name is configured.
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    /// The model exists but is not of the kind the RPC needs.
    #[error("model `{model}` is an {actual} model; {rpc} needs an {expected} model")]
    WrongKind {
        model: String,
        rpc: &'static str,
        expected: &'static str,
        actual: &'static str,
    },
    /// A request field is out of range or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The prompt does not fit the model's context.
    #[error("prompt of {tokens} tokens does not fit model `{model}`: its context holds {max} tokens and at least one must be left to generate")]
    PromptTooLong {
        model: String,
        tokens: usize,
        max: usize,
    },
    /// Admission is full: too many requests are running or queued.
    #[error("server overloaded: {0}")]
    Overloaded(String),
    /// The model is configured but no version of it is loaded.
    #[error("model `{0}` has no active version")]
    NotReady(String),
    /// The request's version was replaced and the drain deadline ended it (retry: the new
    /// version serves).
    #[error("model `{model}` version {version} was replaced and its drain deadline passed; retry to be served by the new version")]
    Drained { model: String, version: String },
    /// The server is shutting down: its grace period ended this request, or it accepts no
    /// new work (retry against another replica).
    #[error("the server is shutting down; retry against another replica")]
    ShuttingDown,
    /// A reload of this model is already running.
    #[error("{0}")]
    ReloadBusy(String),
    /// A compare-and-swap or state condition did not hold.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not enough memory for what was asked.
    #[error("{0}")]
    OutOfMemory(String),
    /// The control call carried no valid admin token.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's deadline passed.
    #[error("deadline exceeded after {0}")]
    DeadlineExceeded(String),
    /// A model could not be loaded or failed during inference.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A bug or an unexpected failure; the message says where.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether this failure counts against the model version that served it (slowness,
    /// inference failures), as opposed to the caller's input or the server's load.
    pub fn counts_against_version(&self) -> bool {
        matches!(
            self,
            Error::DeadlineExceeded(_)
                | Error::Internal(_)
                | Error::Model(crate::model::ModelError::Inference { .. })
        )
    }
}

/// Short alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
