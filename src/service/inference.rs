//! `swapd.v1.Inference`: Generate, Embed, Tokenize, ListModels, GetModel.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert::{self, version_ref};
use super::{deadline, status};
use crate::engine::{self, Engine, GenEvent};
use crate::error::Error;
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

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        req: Request<proto::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
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
        Ok(Response::new(Box::pin(stream)))
    }

    async fn embed(
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

    async fn tokenize(
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
