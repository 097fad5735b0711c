//! Panics as failures: a panic in one request or one reload ends that one, with a status
//! and a message, and nothing else.
use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

/// The message a panic carried (`panic!("…")` gives a `&str` or a `String`).
pub fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// The panic of a joined task as a message; `None` when it was cancelled instead.
pub fn of_join(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => message(p.as_ref()),
        Err(e) => e.to_string(),
    }
}

/// Runs `fut`; a panic while polling it becomes `Err(message)`. The future is dropped after a
/// panic, so whatever it borrowed is free again for the caller to report the failure.
pub async fn catch<F: Future>(fut: F) -> Result<F::Output, String> {
    CatchUnwind { fut: Box::pin(fut) }.await
}

struct CatchUnwind<F> {
    fut: Pin<Box<F>>,
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.fut.as_mut();
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => Poll::Ready(Err(message(p.as_ref()))),
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_panic_while_polling_becomes_its_message() {
        let mut borrowed = 1;
        let r = super::catch(async {
            borrowed += 1;
            tokio::task::yield_now().await;
            if borrowed == 2 {
                panic!("phase {borrowed} broke");
            }
            7
        })
        .await;
        assert_eq!(r, Err("phase 2 broke".to_string()));
        borrowed += 1;
        assert_eq!(borrowed, 3);
        assert_eq!(super::catch(async { 7 }).await, Ok(7));
        let e = tokio::spawn(async { panic!("in a task") })
            .await
            .unwrap_err();
        assert_eq!(super::of_join(e), "in a task");
    }
}
