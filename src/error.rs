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
    /// The caller's deadline passed while the version worked on the request (slowness, which
    /// counts against it).
    #[error("deadline exceeded after {0}")]
    DeadlineExceeded(String),
    /// The caller's deadline passed while the request waited (for a running slot, for a
    /// version, for the client to read): nothing the version did.
    #[error("deadline exceeded while {0}")]
    DeadlineWaiting(String),
    /// A model could not be loaded or failed during inference.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A bug or an unexpected failure; the message says where.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether this failure counts against the model version that served it (slowness,
    /// inference failures), as opposed to the caller's input, the caller's own reading or
    /// the server's load (an automatic rollback only ever sees the version's own failures).
    pub fn counts_against_version(&self) -> bool {
        matches!(
            self,
            Error::DeadlineExceeded(_)
                | Error::Internal(_)
                | Error::Model(crate::model::ModelError::Inference { .. })
        )
    }
}

/// Longest error text a status, a reload result or an audit line carries.
const MAX_MESSAGE: usize = 4096;

/// An error's text as callers, Status and the audit log get it: the message without the
/// backtrace candle appends under `RUST_BACKTRACE` (hundreds of lines of frames), and at
/// most [`MAX_MESSAGE`] bytes.
pub fn clean_message(text: &str) -> String {
    let is_frame = |l: &str| {
        let t = l.trim_start();
        t == "stack backtrace:"
            || t.split_once(':').is_some_and(|(n, _)| {
                !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && l.starts_with(' ')
            })
    };
    let mut out = String::new();
    for line in text.lines() {
        if is_frame(line) {
            break;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(line);
    }
    let out = out.trim_end();
    if out.len() <= MAX_MESSAGE {
        return out.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &out[..end], out.len() - end)
}

/// Short alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    #[test]
    fn messages_lose_their_backtrace_and_stay_bounded() {
        let with_bt = "cannot find tensor blk.0.attn_q.weight\n   0: candle_core::error::Error::bt\n             at /src/error.rs:1\n   1: swapd::model::load\n";
        assert_eq!(
            super::clean_message(with_bt),
            "cannot find tensor blk.0.attn_q.weight"
        );
        let std_bt = "boom\nstack backtrace:\n   0: x";
        assert_eq!(super::clean_message(std_bt), "boom");
        // Lines of a message that merely start with a number are kept.
        assert_eq!(super::clean_message("a\n2: b"), "a\n2: b");
        let long = "é".repeat(5000);
        let c = super::clean_message(&long);
        assert!(c.len() < 4200 && c.ends_with("bytes cut)"), "{}", c.len());
    }
}
