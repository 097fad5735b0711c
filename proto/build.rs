//! Compiles the `swapd.v1` protos at build time with a protoc shipped inside a crate,
//! so no system protoc is needed, and writes the descriptor set for gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // The build script is single-threaded, so setting the variable races with nothing.
        std::env::set_var("PROTOC", protoc);
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/swapd/v1/inference.proto",
        "proto/swapd/v1/control.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .codec_path("crate::service::codec::SwapdCodec")
        .file_descriptor_set_path(out_dir.join("swapd_v1_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
