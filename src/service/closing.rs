//! Once shutdown begins, every new call but a health check is refused with UNAVAILABLE, on
//! connections already open as well as new ones. Stopping the accept loop alone is not
//! enough: a client whose connection was accepted a moment before the signal could still
//! start a call, and a keep-alive connection outlives the accept loop.
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

/// Health checks still answer (NOT_SERVING), so load balancers see the replica leave.
const ALWAYS_ANSWERED: &str = "/grpc.health.v1.Health/";

/// The switch the shutdown path flips, shared by every server's [`ClosingLayer`].
#[derive(Debug, Clone, Default)]
pub struct Closing(Arc<AtomicBool>);

impl Closing {
    /// From now on new calls are refused. It never turns back.
    pub fn close(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_closed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub fn layer(&self) -> ClosingLayer {
        ClosingLayer(self.clone())
    }
}

#[derive(Debug, Clone)]
pub struct ClosingLayer(Closing);

impl<S> tower::Layer<S> for ClosingLayer {
    type Service = Refuse<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Refuse {
            inner,
            closing: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Refuse<S> {
    inner: S,
    closing: Closing,
}

impl<S, B, R> tower::Service<Request<B>> for Refuse<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: Default + Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if self.closing.is_closed() && !req.uri().path().starts_with(ALWAYS_ANSWERED) {
            tracing::debug!(rpc = %req.uri().path(), "refused: shutting down");
            let status = super::status(crate::error::Error::ShuttingDown);
            return Box::pin(async move { Ok(status.into_http()) });
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service};

    #[derive(Clone)]
    struct Answer;
    impl Service<Request<()>> for Answer {
        type Response = Response<String>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Response<String>, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<()>) -> Self::Future {
            std::future::ready(Ok(Response::new("answered".into())))
        }
    }

    async fn call(svc: &mut Refuse<Answer>, path: &str) -> Response<String> {
        let req = Request::builder().uri(path).body(()).unwrap();
        svc.call(req).await.unwrap()
    }

    fn grpc_status(r: &Response<String>) -> Option<&str> {
        r.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn after_close_only_health_checks_are_answered() {
        let closing = Closing::default();
        let mut svc = closing.layer().layer(Answer);
        let list = "/swapd.v1.Inference/ListModels";
        let health = "/grpc.health.v1.Health/Check";
        assert_eq!(call(&mut svc, list).await.body(), "answered");
        closing.close();
        let refused = call(&mut svc, list).await;
        assert_eq!(grpc_status(&refused), Some("14"), "UNAVAILABLE");
        assert!(refused.body().is_empty());
        let health = call(&mut svc, health).await;
        assert_eq!(health.body(), "answered");
        assert_eq!(grpc_status(&health), None);
    }
}
