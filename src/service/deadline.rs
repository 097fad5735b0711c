//! A caller's deadline (`grpc-timeout`) ends a call as DEADLINE_EXCEEDED wherever it passes.
//!
//! tonic's server starts its own timer for `grpc-timeout` right after it calls the layers,
//! and ends a call whose response has not started by then with CANCELLED ("Timeout
//! expired"). Under load a handler may not even have started by then: tonic reads and
//! decodes the request first. So [`DeadlineLayer`] takes the deadline from the header once,
//! counted from the request's arrival at the layers ([`CallDeadline`]), and:
//! - a handler cuts the part of its call before the response a little earlier
//!   ([`before_deadline`]), so the call ends as DEADLINE_EXCEEDED and is counted under its
//!   model; time spent waiting before the first byte never counts against a version
//!   (`Error::DeadlineWaiting`);
//! - the layer answers DEADLINE_EXCEEDED for a call whose handler has not answered by the
//!   deadline itself: tonic polls the call before its own timer, so that answer wins.
//!
//! Once the response has started, the engine ends a stream whose deadline passes.
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};

use super::status;
use crate::error::Error;

/// The caller's deadline, counted from the request's arrival at the server's layers: a
/// request extension, present when the caller sent a valid `grpc-timeout`.
#[derive(Debug, Clone, Copy)]
pub struct CallDeadline(pub Instant);

/// Adds [`Deadline`] to every service of a server.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Deadline { inner }
    }
}

/// Stamps [`CallDeadline`] and answers DEADLINE_EXCEEDED for a call not answered by then.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S, B, R> tower::Service<Request<B>> for Deadline<S>
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let arrived = Instant::now();
        let Some(at) = header_deadline(req.headers(), arrived) else {
            return Box::pin(self.inner.call(req));
        };
        req.extensions_mut().insert(CallDeadline(at));
        let rpc = req.uri().path().to_string();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(at.into(), fut).await {
                Ok(r) => r,
                Err(_) => {
                    let ms = arrived.elapsed().as_secs_f64() * 1e3;
                    tracing::info!(
                        rpc,
                        code = "DEADLINE_EXCEEDED",
                        ms,
                        "request finished: its deadline passed before its handler answered"
                    );
                    Ok(not_started().into_http())
                }
            }
        })
    }
}

/// How much before the caller's deadline the part of a call before its response is cut: a
/// twentieth of the time left, from 2 to 20 ms. A client that enforces the deadline itself
/// started its timer before the request crossed the network and the server's queues, and
/// tonic's client answers its own timer with CANCELLED ("Timeout expired"); cut a little
/// early, the server's DEADLINE_EXCEEDED reaches it first.
fn margin(left: Duration) -> Duration {
    (left / 20).clamp(Duration::from_millis(2), Duration::from_millis(20))
}

/// Runs the part of a call before its response starts within the caller's deadline, a
/// little before it ([`margin`]). A passed deadline is DEADLINE_EXCEEDED, and time spent
/// waiting before the first byte never counts against a version (`Error::DeadlineWaiting`).
pub async fn before_deadline<T>(
    deadline: Option<Instant>,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let Some(d) = deadline else {
        return call.await;
    };
    let left = d.saturating_duration_since(Instant::now());
    let cut = d.checked_sub(margin(left)).unwrap_or(d);
    tokio::time::timeout_at(cut.into(), call)
        .await
        .unwrap_or_else(|_| Err(not_started()))
}

/// The status of a call whose deadline passed before its response started. It never counts
/// against a version.
fn not_started() -> tonic::Status {
    status(Error::DeadlineWaiting(
        "the deadline passed before the response started".into(),
    ))
}

/// The caller's deadline, if it sent one: the one [`DeadlineLayer`] took, counted from the
/// request's arrival (as tonic's own timer is), not from when its handler got to run.
/// Without the layer (a handler called directly) it is read from the header, from now.
pub fn deadline<T>(req: &tonic::Request<T>) -> Option<Instant> {
    match req.extensions().get::<CallDeadline>() {
        Some(d) => Some(d.0),
        None => header_deadline(req.metadata().as_ref(), Instant::now()),
    }
}

/// `from` plus the `grpc-timeout` in `headers`, when it holds a valid one.
fn header_deadline(headers: &http::HeaderMap, from: Instant) -> Option<Instant> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(v).map(|d| from + d)
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
    fn the_cut_comes_a_twentieth_early_within_bounds() {
        assert_eq!(margin(Duration::ZERO), Duration::from_millis(2));
        assert_eq!(margin(Duration::from_millis(30)), Duration::from_millis(2));
        assert_eq!(
            margin(Duration::from_millis(200)),
            Duration::from_millis(10)
        );
        assert_eq!(margin(Duration::from_secs(60)), Duration::from_millis(20));
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
    fn a_deadline_counts_from_the_requests_arrival_not_from_its_handler() {
        let arrived = Instant::now() - Duration::from_millis(50);
        let mut req = tonic::Request::new(());
        req.metadata_mut()
            .insert("grpc-timeout", "60m".parse().unwrap());
        let at = header_deadline(req.metadata().as_ref(), arrived).unwrap();
        assert_eq!(at, arrived + Duration::from_millis(60));
        req.extensions_mut().insert(CallDeadline(at));
        assert_eq!(deadline(&req), Some(at));
        // Without the layer's stamp (a handler called directly), it counts from now.
        let mut bare = tonic::Request::new(());
        bare.metadata_mut()
            .insert("grpc-timeout", "60m".parse().unwrap());
        assert!(deadline(&bare).unwrap() > Instant::now() + Duration::from_millis(50));
        assert_eq!(deadline(&tonic::Request::new(())), None);
    }

    #[tokio::test]
    async fn the_layer_answers_deadline_exceeded_for_a_handler_that_never_answers() {
        use tower::{Layer, Service, ServiceExt};
        let never = tower::service_fn(|req: Request<()>| async move {
            assert!(req.extensions().get::<CallDeadline>().is_some(), "stamped");
            std::future::pending::<Result<Response<tonic::body::Body>, std::convert::Infallible>>()
                .await
        });
        let mut svc = DeadlineLayer.layer(never);
        let req = Request::builder()
            .uri("/swapd.v1.Inference/Generate")
            .header("grpc-timeout", "20m")
            .body(())
            .unwrap();
        let started = Instant::now();
        let resp = svc.ready().await.unwrap().call(req).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(20));
        let s = tonic::Status::from_header_map(resp.headers()).expect("a gRPC status");
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        // Without a deadline, the call is the handler's alone.
        let quick = tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(tonic::body::Body::empty()))
        });
        let req = Request::builder().uri("/x").body(()).unwrap();
        let resp = DeadlineLayer.layer(quick).oneshot(req).await.unwrap();
        assert!(tonic::Status::from_header_map(resp.headers()).is_none());
    }
}
