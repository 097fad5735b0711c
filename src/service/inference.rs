//! `swapd.v1.Inference`: Generate, Embed, Tokenize, ListModels, GetModel.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert::{self, version_ref};
use super::{before_deadline, deadline, status};
use crate::engine::{self, Engine, GenEvent};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::model::ModelKind;
use crate::proto;
use crate::proto::inference_server::Inference;
use crate::registry::Registry;

/// The inference service: a registry to lease versions from and the engine to run them.
#[derive(Clone)]
pub struct InferenceService {
    pub registry: Arc<Registry>,
    pub engine: Engine,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<proto::GenerateResponse, Status>> + Send>>;

impl InferenceService {
    /// The model label for metrics: a configured model's name, never a caller's arbitrary
    /// string (which would grow the label set without bound).
    fn label(&self, model: &str) -> String {
        super::model_label(&self.registry, model).to_string()
    }

    /// Counts and logs a finished unary call.
    fn done<T>(&self, model: &str, rpc: &'static str, started: Instant, r: &Result<T, Status>) {
        let label = super::model_label(&self.registry, model);
        finished(&self.engine.metrics, label, rpc, super::code_of(r), started);
    }

    async fn generate_inner(
        &self,
        req: Request<proto::GenerateRequest>,
    ) -> Result<GenerateStream, Status> {
        let admitted_at = Instant::now();
        let deadline = deadline(&req);
        let req = engine::GenerateRequest::try_from(req.into_inner()).map_err(status)?;
        // Admission first: a request waiting out a resource-preserving reload holds a
        // bounded queue place.
        let ticket = self.engine.admit().map_err(status)?;
        let lease = self
            .registry
            .lease_wait(&req.model, ModelKind::Llm, "Generate", deadline)
            .await
            .map_err(status)?;
        let prepared = self
            .engine
            .prepare(lease.version().clone(), req.input.clone())
            .await
            .map_err(status)?;
        let vref = version_ref(&lease);
        let rx = self
            .engine
            .generate(lease, ticket, prepared, &req, deadline, admitted_at)
            .map_err(status)?;
        let stream = ReceiverStream::new(rx).map(move |ev| {
            let event = match ev.map_err(status)? {
                GenEvent::Delta { text, token_ids } => {
                    proto::generate_response::Event::Delta(proto::TextDelta { text, token_ids })
                }
                GenEvent::Finished(f) => {
                    proto::generate_response::Event::Finished(convert::finished(f))
                }
            };
            Ok(proto::GenerateResponse {
                version: Some(vref.clone()),
                event: Some(event),
            })
        });
        Ok(Box::pin(stream))
    }

    async fn embed_inner(
        &self,
        req: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let deadline = deadline(&req);
        let req = req.into_inner();
        let model = convert::model_name(&req.model).map_err(status)?;
        if req.texts.is_empty() {
            return Err(status(Error::InvalidArgument("`texts` is empty".into())));
        }
        let max = self.engine.limits.max_embed_batch;
        if req.texts.len() > max {
            return Err(status(Error::InvalidArgument(format!(
                "{} texts in one batch: at most {max}",
                req.texts.len()
            ))));
        }
        let ticket = self.engine.admit().map_err(status)?;
        let lease = self
            .registry
            .lease_wait(&model, ModelKind::Embedding, "Embed", deadline)
            .await
            .map_err(status)?;
        let (lease, out) = self
            .engine
            .embed(lease, ticket, req.texts, deadline)
            .await
            .map_err(status)?;
        let dimension = out.first().map(|e| e.values.len()).unwrap_or(0) as u32;
        let total_tokens = out.iter().map(|e| e.tokens as u32).sum();
        Ok(Response::new(proto::EmbedResponse {
            version: Some(version_ref(&lease)),
            dimension,
            total_tokens,
            embeddings: out
                .into_iter()
                .map(|e| proto::Embedding {
                    values: e.values,
                    tokens: e.tokens as u32,
                    truncated: e.truncated,
                })
                .collect(),
        }))
    }

    async fn tokenize_inner(
        &self,
        req: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let deadline = deadline(&req);
        let req = req.into_inner();
        let model = convert::model_name(&req.model).map_err(status)?;
        let input = convert::tokenize_input(req.input).map_err(status)?;
        let lease = self
            .registry
            .lease_wait(&model, ModelKind::Llm, "Tokenize", deadline)
            .await
            .map_err(status)?;
        let prepared = self
            .engine
            .prepare(lease.version().clone(), input)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::TokenizeResponse {
            version: Some(version_ref(&lease)),
            ids: prepared.ids,
            text: prepared.text,
        }))
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let started = Instant::now();
        let model = self.label(&req.get_ref().model);
        match before_deadline(deadline(&req), self.generate_inner(req)).await {
            Ok(stream) => Ok(Response::new(Box::pin(Recorded {
                inner: stream,
                metrics: self.engine.metrics.clone(),
                model,
                started,
                code: None,
                span: tracing::Span::current(),
            }))),
            Err(s) => {
                finished(&self.engine.metrics, &model, "Generate", s.code(), started);
                Err(s)
            }
        }
    }

    async fn embed(
        &self,
        req: Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        let started = Instant::now();
        let model = req.get_ref().model.clone();
        let r = before_deadline(deadline(&req), self.embed_inner(req)).await;
        self.done(&model, "Embed", started, &r);
        r
    }

    async fn tokenize(
        &self,
        req: Request<proto::TokenizeRequest>,
    ) -> Result<Response<proto::TokenizeResponse>, Status> {
        let started = Instant::now();
        let model = req.get_ref().model.clone();
        let r = before_deadline(deadline(&req), self.tokenize_inner(req)).await;
        self.done(&model, "Tokenize", started, &r);
        r
    }

    async fn list_models(
        &self,
        _req: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        let models = self
            .registry
            .slots()
            .iter()
            .filter_map(|s| s.active())
            .map(|v| convert::model_info(&v))
            .collect();
        Ok(Response::new(proto::ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        req: Request<proto::GetModelRequest>,
    ) -> Result<Response<proto::ModelInfo>, Status> {
        let name = convert::model_name(&req.into_inner().model).map_err(status)?;
        let slot = self.registry.slot(&name).map_err(status)?;
        let v = slot.active().ok_or_else(|| status(Error::NotReady(name)))?;
        Ok(Response::new(convert::model_info(&v)))
    }
}

/// Counts a finished request and logs it (inside the request's span, which names its id).
fn finished(
    metrics: &Metrics,
    model: &str,
    rpc: &'static str,
    code: tonic::Code,
    started: Instant,
) {
    metrics.request(model, rpc, code);
    let ms = started.elapsed().as_secs_f64() * 1e3;
    let code = crate::metrics::code_name(code);
    tracing::info!(model, rpc, code, ms, "request finished");
}

/// A generation stream that counts and logs itself when it ends: OK after its `Finished`
/// event, the error's code after an error, CANCELLED when the client left before either.
struct Recorded {
    inner: GenerateStream,
    metrics: Arc<Metrics>,
    model: String,
    started: Instant,
    code: Option<tonic::Code>,
    /// The request's span: the stream ends outside the handler, on the connection's task.
    span: tracing::Span,
}

impl Stream for Recorded {
    type Item = Result<proto::GenerateResponse, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let item = this.inner.as_mut().poll_next(cx);
        if let std::task::Poll::Ready(Some(r)) = &item {
            match r {
                Ok(resp) => {
                    if let Some(proto::generate_response::Event::Finished(_)) = &resp.event {
                        this.code = Some(tonic::Code::Ok);
                    }
                }
                Err(s) => this.code = Some(s.code()),
            }
        }
        item
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        let _in_request = self.span.enter();
        finished(&self.metrics, &self.model, "Generate", code, self.started);
    }
}
