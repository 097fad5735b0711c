//! swapd serves language models over gRPC and swaps in new model versions while it keeps serving.
//!
//! The library holds everything; `main.rs` only parses the command line and hands off.
//! Data flow: `service` (proto ⇄ domain) → `registry` (which version is active) → `engine`
//! (admission, blocking inference threads) → `model` (candle models, tokenizers, sampling).
//! `metrics` is the sink everything records into; `scrape` reads the state gauges from above.
//! `unsafe` is denied everywhere but `memory`, which calls the C allocator (and, with the
//! `cuda` feature, the driver's memory-pool trim), `quant`, whose SIMD kernels read packed
//! weights through raw pointers, and one block of `device` (cudarc's event tracking).
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod health;
pub mod manifest;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod panic;
pub mod quant;
pub mod registry;
pub mod scrape;
pub mod server;
pub mod service;
pub mod triggers;
pub mod turns;

/// Generated `swapd.v1` protobuf and gRPC code.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("swapd.v1");

    /// Encoded descriptor set of the `swapd.v1` protos, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("swapd_v1_descriptor");
}

pub use error::Error;
