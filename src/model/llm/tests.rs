//! Tests of GGUF loading: a broken or unusable file is an error naming what is wrong, never a
//! panic; the tiny model and the real one pass.
use super::*;
use crate::model::synth::{write_tiny_llama_gguf, TinyLlm};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use std::path::PathBuf;

type Meta = Vec<(String, Value)>;
type Tensors = Vec<(String, QTensor)>;

/// The tiny llama GGUF rewritten after `edit` changed its metadata and tensors.
fn tiny_with(dir: &Path, name: &str, edit: impl FnOnce(&mut Meta, &mut Tensors)) -> PathBuf {
    let src = dir.join("tiny.gguf");
    if !src.exists() {
        write_tiny_llama_gguf(&src, &TinyLlm::default()).unwrap();
    }
    let mut f = std::io::BufReader::new(std::fs::File::open(&src).unwrap());
    let ct = Content::read(&mut f).unwrap();
    let mut meta: Meta = ct.metadata.clone().into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors: Tensors = ct
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), ct.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut meta, &mut tensors);
    let dst = dir.join(name);
    let md: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&dst).unwrap());
    gguf_file::write(&mut out, &md, &ts).unwrap();
    std::io::Write::flush(&mut out).unwrap();
    dst
}

fn set(meta: &mut Meta, key: &str, v: Value) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.to_string(), v));
}

fn load_err(path: &Path) -> String {
    match Llm::load("m", path, &Device::Cpu, 512) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => {
            assert_eq!(e.check_name(), "format", "{e}");
            assert!(matches!(e, ModelError::Format { .. }), "{e}");
            e.to_string()
        }
    }
}

#[test]
fn alignment_zero_is_a_format_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_with(dir.path(), "a0.gguf", |m, _| {
        set(m, "general.alignment", Value::U32(0))
    });
    let e = weight_bytes_of(&p, true).unwrap_err();
    assert!(
        e.contains("general.alignment is 0: must be a power of two"),
        "{e}"
    );
    let e = load_err(&p);
    assert!(e.contains("general.alignment is 0"), "{e}");
}

#[test]
fn empty_and_short_files_say_how_short() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    let want = "file is 0 bytes: too short to be a GGUF file (the header is at least 24 bytes)";
    assert_eq!(weight_bytes_of(&p, true).unwrap_err(), want);
    assert!(load_err(&p).contains(want));
    std::fs::write(&p, b"GGUF\x03\0\0\0\x01").unwrap();
    assert!(weight_bytes_of(&p, true)
        .unwrap_err()
        .contains("file is 9 bytes: too short to be a GGUF v3 file"));
}

#[test]
fn huge_counts_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_with(dir.path(), "t.gguf", |_, _| {});
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = weight_bytes_of(&p, true).unwrap_err();
    assert!(
        e.contains("tensor count 1099511627776 (2^40) exceeds what a"),
        "{e}"
    );
}

#[test]
fn the_tiny_model_and_the_real_one_pass_the_checks() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_with(dir.path(), "t.gguf", |_, _| {});
    let mut f = std::io::BufReader::new(std::fs::File::open(&p).unwrap());
    let (ct, h) = header::read_gguf(&mut f).unwrap();
    assert_eq!(h.tensor_data_offset, ct.tensor_data_offset);
    let params = check_llama(&ct).unwrap();
    assert_eq!((params.head_dim, params.context_length), (16, Some(512)));
    let real = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if real.exists() {
        let mut f = std::io::BufReader::new(std::fs::File::open(&real).unwrap());
        let (ct, h) = header::read_gguf(&mut f).unwrap();
        assert_eq!(h.tensor_data_offset, ct.tensor_data_offset);
        assert_eq!(h.tensor_count as usize, ct.tensor_infos.len());
        let params = check_llama(&ct).unwrap();
        assert_eq!(params.vocab, Some(49152));
    }
}

/// An architecture or tokenizer swapd does not run is refused by name, with the list it
/// does run; "not a valid GGUF" stays for invalid files.
#[test]
fn unsupported_architectures_and_tokenizers_name_themselves_and_the_supported_list() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_with(dir.path(), "arch.gguf", |m, _| {
        set(m, "general.architecture", Value::String("mamba".into()))
    });
    let err = Llm::load("m", &p, &Device::Cpu, 512).err().unwrap();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err}");
    let err = err.to_string();
    assert!(
        err.contains(
            "architecture `mamba` is not supported (supported: llama, gemma3, qwen2, qwen3, phi3)"
        ),
        "{err}"
    );
    assert!(!err.contains("not a valid GGUF"), "{err}");
    let p = tiny_with(dir.path(), "tok.gguf", |m, _| {
        set(m, "tokenizer.ggml.model", Value::String("rwkv".into()))
    });
    let err = Llm::load("m", &p, &Device::Cpu, 512).err().unwrap();
    assert_eq!(err.check_name(), "tokenizer", "{err}");
    let err = err.to_string();
    assert!(
        err.contains("tokenizer.ggml.model `rwkv` is not supported (supported: gpt2, llama)"),
        "{err}"
    );
}

/// Metadata that loads but cannot serve fails `format` at load, naming the problem.
#[test]
fn unusable_metadata_fails_format_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let u = Value::U32;
    type Mutate = Box<dyn FnOnce(&mut Meta, &mut Tensors)>;
    let cases: Vec<(&str, Mutate, &str)> = vec![
        (
            "ctx0",
            Box::new(move |m, _| set(m, "llama.context_length", u(0))),
            "llama.context_length is 0",
        ),
        (
            "embd0",
            Box::new(move |m, _| set(m, "llama.embedding_length", u(0))),
            "llama.embedding_length is 0",
        ),
        (
            "blocks0",
            Box::new(move |m, _| set(m, "llama.block_count", u(0))),
            "llama.block_count is 0",
        ),
        (
            "heads3",
            Box::new(move |m, _| set(m, "llama.attention.head_count", u(3))),
            "llama.embedding_length 64 is not a multiple of llama.attention.head_count 3",
        ),
        (
            "kv0",
            Box::new(move |m, _| set(m, "llama.attention.head_count_kv", u(0))),
            "llama.attention.head_count_kv is 0",
        ),
        (
            "kv3",
            Box::new(move |m, _| set(m, "llama.attention.head_count_kv", u(3))),
            "llama.attention.head_count 4 is not a multiple of llama.attention.head_count_kv 3",
        ),
        (
            "rope-nan",
            Box::new(|m, _| set(m, "llama.rope.freq_base", Value::F32(f32::NAN))),
            "llama.rope.freq_base is NaN",
        ),
        (
            "rope-inf",
            Box::new(|m, _| set(m, "llama.rope.freq_base", Value::F32(f32::INFINITY))),
            "llama.rope.freq_base is inf",
        ),
        (
            "rope-dim",
            Box::new(move |m, _| set(m, "llama.rope.dimension_count", u(1 << 31))),
            "llama.rope.dimension_count 2147483648 differs from the head size 16",
        ),
        (
            "eps0",
            Box::new(|m, _| set(m, "llama.attention.layer_norm_rms_epsilon", Value::F32(0.0))),
            "llama.attention.layer_norm_rms_epsilon is 0",
        ),
        (
            "eps-nan",
            Box::new(|m, _| {
                set(
                    m,
                    "llama.attention.layer_norm_rms_epsilon",
                    Value::F32(f32::NAN),
                )
            }),
            "llama.attention.layer_norm_rms_epsilon is NaN",
        ),
        (
            "vocab",
            Box::new(|m, _| {
                let mut tokens = m
                    .iter()
                    .find(|(k, _)| k == "tokenizer.ggml.tokens")
                    .unwrap()
                    .1
                    .to_vec()
                    .unwrap()
                    .clone();
                tokens.push(Value::String("extra".into()));
                set(m, "tokenizer.ggml.tokens", Value::Array(tokens));
            }),
            "has 271 rows but tokenizer.ggml.tokens has 272 tokens",
        ),
        (
            "head",
            Box::new(|_, t| {
                let out = t.iter_mut().find(|(n, _)| n == "output.weight").unwrap();
                let w =
                    candle_core::Tensor::zeros((270, 64), candle_core::DType::F32, &Device::Cpu)
                        .unwrap();
                out.1 = QTensor::quantize(&w, GgmlDType::F32).unwrap();
            }),
            "tensor `output.weight` has shape [270, 64], expected [271, 64]",
        ),
        (
            "kv-shape",
            Box::new(move |m, _| set(m, "llama.attention.head_count_kv", u(4))),
            "tensor `blk.0.attn_k.weight` has shape [32, 64], expected [64, 64]",
        ),
        (
            "missing",
            Box::new(|_, t| t.retain(|(n, _)| n != "blk.1.ffn_up.weight")),
            "tensor `blk.1.ffn_up.weight` is missing",
        ),
        (
            "ctx-type",
            Box::new(|m, _| set(m, "llama.context_length", Value::U64(512))),
            "llama.context_length is U64(512): expected a u32",
        ),
    ];
    for (name, edit, want) in cases {
        let p = tiny_with(dir.path(), &format!("{name}.gguf"), edit);
        let e = load_err(&p);
        assert!(e.contains(want), "{name}: {e}");
    }
}
