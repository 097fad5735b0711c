//! gRPC services: they translate protobuf to domain types and back, and nothing else.
//! [`status`] is the one place a domain error becomes a gRPC status.
pub mod closing;
pub mod codec;
pub mod control;
pub mod convert;
pub mod inference;
pub mod request_id;

use std::time::{Duration, Instant};

use tonic::{Code, Status};

use crate::error::Error;
use crate::model::ModelError;

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

/// How much before the caller's deadline the part of a call before its response is cut.
const BEFORE_TONIC: Duration = Duration::from_millis(2);

/// Runs the part of a call before its response starts within the caller's deadline, a
/// little before tonic's own timer. tonic ends a call whose response has not started by the
/// `grpc-timeout` with CANCELLED ("Timeout expired"); a passed deadline is
/// DEADLINE_EXCEEDED, and time spent waiting before the first byte never counts against a
/// version (`Error::DeadlineWaiting`).
pub async fn before_deadline<T>(
    deadline: Option<Instant>,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let Some(d) = deadline else {
        return call.await;
    };
    let cut = d.checked_sub(BEFORE_TONIC).unwrap_or(d);
    tokio::time::timeout_at(cut.into(), call)
        .await
        .unwrap_or_else(|_| {
            Err(status(Error::DeadlineWaiting(
                "the deadline passed before the response started".into(),
            )))
        })
}

/// The caller's deadline from the `grpc-timeout` header, if it sent one.
pub fn deadline<T>(req: &tonic::Request<T>) -> Option<Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(v).map(|d| Instant::now() + d)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_cut_by_its_deadline_is_deadline_exceeded_before_tonic_cancels_it() {
        let start = Instant::now();
        let never = std::future::pending::<Result<(), tonic::Status>>();
        let r = before_deadline(Some(start + Duration::from_millis(30)), never).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        // Cut before the deadline itself, where tonic's timer would answer CANCELLED.
        assert!(start.elapsed() < Duration::from_millis(30) + Duration::from_millis(25));
        let done = before_deadline(Some(start), async { Ok::<_, tonic::Status>(7) }).await;
        assert_eq!(done.unwrap(), 7, "a call that is ready is not cut");
        assert_eq!(
            before_deadline(None, async { Ok::<_, tonic::Status>(1) })
                .await
                .unwrap(),
            1
        );
    }

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

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
