//! gRPC services: they translate protobuf to domain types and back, and nothing else.
//! [`status`] is the one place a domain error becomes a gRPC status.
pub mod closing;
pub mod codec;
pub mod control;
pub mod convert;
pub mod deadline;
pub mod inference;
pub mod request_id;

use tonic::{Code, Status};

use crate::error::Error;
use crate::model::ModelError;

pub use deadline::{before_deadline, deadline};

/// The gRPC status for a domain error.
pub fn status(e: Error) -> Status {
    let code = match &e {
        Error::UnknownModel(_) => Code::NotFound,
        Error::WrongKind { .. } | Error::InvalidArgument(_) | Error::PromptTooLong { .. } => {
            Code::InvalidArgument
        }
        Error::Overloaded(_) => Code::ResourceExhausted,
        Error::NotReady(_) => Code::Unavailable,
        Error::DeadlineExceeded(_) | Error::DeadlineWaiting(_) => Code::DeadlineExceeded,
        Error::Drained { .. } | Error::ShuttingDown => Code::Unavailable,
        Error::ReloadBusy(_) => Code::Aborted,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::OutOfMemory(_) => Code::ResourceExhausted,
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::Model(m) => match m {
            // The request's content could not be rendered or tokenized.
            ModelError::ChatTemplate { .. } | ModelError::Tokenizer { .. } => Code::InvalidArgument,
            ModelError::Inference { .. } => Code::Internal,
            _ => Code::FailedPrecondition,
        },
        Error::Internal(_) => Code::Internal,
    };
    Status::new(code, crate::error::clean_message(&e.to_string()))
}

/// The gRPC code a handler's result ends with.
pub fn code_of<T>(r: &Result<T, Status>) -> Code {
    r.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code())
}

/// The model label for metrics and request logs: a configured model's name, never a caller's
/// arbitrary string (which would grow the label set without bound).
pub fn model_label<'a>(registry: &crate::registry::Registry, model: &'a str) -> &'a str {
    if !model.is_empty() && registry.slot(model).is_ok() {
        model
    } else {
        "_unknown"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_gets_its_code() {
        let cases = [
            (Error::UnknownModel("x".into()), Code::NotFound),
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (
                Error::PromptTooLong {
                    model: "m".into(),
                    tokens: 9,
                    max: 8,
                },
                Code::InvalidArgument,
            ),
            (Error::Overloaded("x".into()), Code::ResourceExhausted),
            (Error::NotReady("x".into()), Code::Unavailable),
            (Error::DeadlineExceeded("x".into()), Code::DeadlineExceeded),
            (Error::DeadlineWaiting("x".into()), Code::DeadlineExceeded),
            (Error::Internal("x".into()), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(status(e).code(), code);
        }
    }
}
