//! One tracing span per request, named by a request id: the caller's `x-request-id` when it
//! sent a usable one, else a fresh one. The id goes back in the response's `x-request-id`
//! header, so a caller can quote it and an operator can find every log line of the request.
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tracing::Instrument;

pub const HEADER: &str = "x-request-id";

/// A caller's id is kept only if it is short, printable ASCII without spaces: anything else
/// could forge log fields or flood the logs.
fn usable(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A fresh id: 16 random hex digits.
pub fn fresh() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Adds [`RequestId`] to every service of a server.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestId { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, B, R> tower::Service<Request<B>> for RequestId<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = req
            .headers()
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| usable(v))
            .map(str::to_string)
            .unwrap_or_else(fresh);
        // Both are printable ASCII, so these never fail.
        let value = HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("invalid"));
        req.headers_mut().insert(HEADER, value.clone());
        let span = tracing::info_span!("request", request_id = %id, rpc = %req.uri().path());
        let fut = span.in_scope(|| self.inner.call(req)).instrument(span);
        Box::pin(async move {
            let mut resp = fut.await?;
            resp.headers_mut().insert(HEADER, value);
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_short_ids_are_kept() {
        assert!(usable("abc-123_XYZ"));
        assert!(!usable(""));
        assert!(!usable("has space"));
        assert!(!usable("line\nbreak"));
        assert!(!usable(&"x".repeat(129)));
        assert_eq!(fresh().len(), 16);
    }
}
