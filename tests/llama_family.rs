//! The llama family on tiny random-weight GGUFs that swapd writes deterministically: qwen2
//! (query/key/value biases), qwen3 (per-head query/key norms, a head size that is not
//! dim / heads), phi3 (fused projections, a SentencePiece vocabulary) and llama 3 (RoPE
//! frequency factors, the `llama-bpe` pre-tokenizer), all with NEOX or NORM RoPE as
//! llama.cpp has it. Checked against llama.cpp's logits, greedy ids, text ids and rendered
//! chats for the same files (`tests/fixtures/synth-llamacpp-reference.json`, made by
//! `scripts/peers/synth_fixtures.py`) and against candle-transformers' `quantized_qwen2`,
//! `quantized_qwen3`, `quantized_phi3` and `quantized_llama`.
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use swapd::model::chat::ChatMessage;
use swapd::model::synth::{write_tiny_llama_gguf, TinyLlm, Variant};
use swapd::model::Llm;

/// Below this top-1 minus top-2 margin a greedy step is a near-tie.
const NEAR_TIE: f32 = 0.2;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
    texts: Vec<Text>,
    chats: Vec<Chat>,
}

#[derive(Deserialize)]
struct Text {
    arch: String,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Chat {
    arch: String,
    messages: Vec<Message>,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Case {
    arch: String,
    sha256: String,
    prompt_ids: Vec<u32>,
    logits: Vec<f32>,
    greedy_ids: Vec<u32>,
    margins: Vec<f32>,
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("fixtures/synth-llamacpp-reference.json")).unwrap()
}

/// Writes the variant `arch`'s seed-1 file (what `swapd bench synth --arch A` writes as v1).
fn write(dir: &Path, arch: &str) -> PathBuf {
    let path = dir.join(format!("{arch}.gguf"));
    if !path.exists() {
        let variant = Variant::from_name(arch).unwrap_or_else(|| panic!("no variant {arch}"));
        let opts = TinyLlm {
            seed: 1,
            variant,
            ..Default::default()
        };
        write_tiny_llama_gguf(&path, &opts).unwrap();
    }
    path
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap() as u32
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// A GGUF's metadata and tensors, by name.
type Metadata = Vec<(String, gguf_file::Value)>;
type Tensors = Vec<(String, QTensor)>;

/// A copy of the GGUF at `src`, its metadata and tensors passed through `edit`.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Metadata, &mut Tensors)) {
    let mut r = std::io::BufReader::new(std::fs::File::open(src).unwrap());
    let ct = gguf_file::Content::read(&mut r).unwrap();
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Tensors = names
        .into_iter()
        .map(|n| (n.clone(), ct.tensor(&mut r, n, &Device::Cpu).unwrap()))
        .collect();
    let mut md: Metadata = ct.metadata.into_iter().collect();
    edit(&mut md, &mut tensors);
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(dst).unwrap());
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

/// A copy of the GGUF at `src` without `rope_freqs.weight` (llama 3's RoPE factors).
fn without_rope_factors(src: &Path, dst: &Path) {
    rewrite(src, dst, |_, t| t.retain(|(n, _)| n != "rope_freqs.weight"));
}

/// candle-transformers' own implementation's next-token logits after `ids`.
fn candle_logits(arch: &str, path: &Path, ids: &[u32]) -> Vec<f32> {
    let mut f = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let cpu = &Device::Cpu;
    let logits = match arch {
        "qwen2" => {
            use candle_transformers::models::quantized_qwen2::ModelWeights;
            ModelWeights::from_gguf(ct, &mut f, cpu)
                .unwrap()
                .forward(&x, 0)
        }
        "qwen3" => {
            use candle_transformers::models::quantized_qwen3::ModelWeights;
            ModelWeights::from_gguf(ct, &mut f, cpu)
                .unwrap()
                .forward(&x, 0)
        }
        "phi3" => {
            use candle_transformers::models::quantized_phi3::ModelWeights;
            ModelWeights::from_gguf(false, ct, &mut f, cpu)
                .unwrap()
                .forward(&x, 0)
        }
        _ => {
            use candle_transformers::models::quantized_llama::ModelWeights;
            ModelWeights::from_gguf(ct, &mut f, cpu)
                .unwrap()
                .forward(&x, 0)
        }
    };
    logits.unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn text_ids_and_rendered_chats_equal_llama_cpp() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    for t in &fixture.texts {
        let llm = Llm::load(&t.arch, &write(dir.path(), &t.arch), &Device::Cpu, 256).unwrap();
        assert_eq!(
            llm.tokenizer.encode(&t.text).unwrap(),
            t.ids,
            "{}: ids of {:?} (pre-tokenizer `{}`)",
            t.arch,
            t.text,
            llm.tokenizer.pre
        );
    }
    assert!(fixture.chats.iter().any(|c| c.arch == "phi3"));
    assert!(fixture.chats.iter().any(|c| c.arch == "llama3"));
    for c in &fixture.chats {
        let llm = Llm::load(&c.arch, &write(dir.path(), &c.arch), &Device::Cpu, 256).unwrap();
        let messages: Vec<ChatMessage> = c
            .messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        let text = llm.render_chat(&messages).unwrap();
        // Llama 3's Jinja template writes the BOS itself; llama.cpp's built-in rendering
        // leaves it to the tokenizer's BOS rule. The ids are the same either way.
        let bos = llm.tokenizer.bos_token.clone().unwrap_or_default();
        let bare = match c.arch.as_str() {
            "llama3" => text.strip_prefix(bos.as_str()).unwrap_or(&text),
            _ => &text,
        };
        assert_eq!(bare, c.text, "{}: the rendered chat", c.arch);
        assert_eq!(
            llm.tokenizer.encode(&text).unwrap(),
            c.ids,
            "{}: ids of the rendered chat {text:?}",
            c.arch
        );
    }
}

#[test]
fn logits_and_greedy_ids_agree_with_llama_cpp_and_candle() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    for arch in ["qwen2", "qwen3", "phi3", "llama3"] {
        assert!(fixture.cases.iter().any(|c| c.arch == arch), "{arch}");
    }
    for c in &fixture.cases {
        let path = write(dir.path(), &c.arch);
        let (sha, _) = swapd::model::verify::sha256_file(&path).unwrap();
        assert_eq!(
            sha, c.sha256,
            "{}: the synthetic file changed; regenerate the fixture",
            c.arch
        );

        // Next-token logits after the prompt: llama.cpp's, and candle's implementation.
        let llm = Llm::load(&c.arch, &path, &Device::Cpu, 256).unwrap();
        let ours = llm.next_logits(&c.prompt_ids).unwrap();
        let d_llama = max_diff(&ours, &c.logits);
        // candle's quantized llama ignores llama 3's RoPE factors (`rope_freqs.weight`):
        // it is compared on the file without them, and swapd follows llama.cpp (and Meta's
        // reference), which divide each pair's frequency by its factor.
        let (ours_c, theirs) = if c.arch == "llama3" {
            let plain = dir.path().join("llama3-no-factors.gguf");
            without_rope_factors(&path, &plain);
            let llm = Llm::load("plain", &plain, &Device::Cpu, 256).unwrap();
            let unscaled = llm.next_logits(&c.prompt_ids).unwrap();
            let apart = max_diff(&unscaled, &ours);
            eprintln!("llama3: the RoPE factors move the logits by up to {apart:.4}");
            assert!(apart > 0.01, "llama3: the RoPE factors changed nothing");
            (unscaled, candle_logits("llama", &plain, &c.prompt_ids))
        } else {
            (ours.clone(), candle_logits(&c.arch, &path, &c.prompt_ids))
        };
        let d_candle = max_diff(&ours_c, &theirs);
        let spread = c.logits.iter().fold(0f32, |m, x| m.max(x.abs()));
        eprintln!(
            "{} {:?}: max |logit diff| vs llama.cpp {d_llama:.4}, vs candle {d_candle:.4} (logits up to {spread:.2})",
            c.arch, c.prompt_ids
        );
        assert!(
            d_llama < 0.05 * spread.max(1.0),
            "{}: logits vs llama.cpp",
            c.arch
        );
        assert!(
            d_candle < 0.05 * spread.max(1.0),
            "{}: logits vs candle",
            c.arch
        );
        if c.margins[0] >= NEAR_TIE {
            assert_eq!(
                argmax(&ours_c),
                argmax(&theirs),
                "{}: candle's next token",
                c.arch
            );
        }

        // 32 greedy steps: llama.cpp's ids, up to a step where its margin was a near-tie.
        let mut session = llm.session();
        let mut logits = session.feed(&c.prompt_ids, &mut || true).unwrap();
        for (i, (&want, &margin)) in c.greedy_ids.iter().zip(&c.margins).enumerate() {
            let got = argmax(&logits.unwrap().to_vec1::<f32>().unwrap());
            if got != want {
                assert!(
                    margin < NEAR_TIE,
                    "{}: greedy step {i} is {got}, llama.cpp's {want} (margin {margin})",
                    c.arch
                );
                break;
            }
            logits = session.feed(&[got], &mut || true).unwrap();
        }
    }
}

/// An F32 vector of `n` ones, as a GGUF tensor.
fn ones_f32(n: usize) -> QTensor {
    let t = Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32).unwrap()
}

#[test]
fn what_is_not_supported_is_refused_by_name() {
    use gguf_file::Value as V;
    let dir = tempfile::tempdir().unwrap();
    let (llama3, phi3) = (write(dir.path(), "llama3"), write(dir.path(), "phi3"));
    let set = |md: &mut Vec<(String, V)>, key: &str, value: V| {
        md.retain(|(k, _)| k != key);
        md.push((key.into(), value));
    };
    let refused = |src: &Path, edit: &dyn Fn(&mut Metadata, &mut Tensors)| {
        let bad = dir.path().join("bad.gguf");
        rewrite(src, &bad, edit);
        Llm::load("bad", &bad, &Device::Cpu, 256)
            .err()
            .unwrap()
            .to_string()
    };
    let e = refused(&llama3, &|md, _| {
        set(md, "llama.rope.scaling.type", V::String("yarn".into()))
    });
    assert!(
        e.contains("llama.rope.scaling.type `yarn` is not supported (supported: none, linear)"),
        "{e}"
    );
    let e = refused(&llama3, &|md, _| {
        set(md, "tokenizer.ggml.pre", V::String("tekken".into()))
    });
    assert!(
        e.contains("tokenizer.ggml.pre `tekken` is not supported (supported: default, gpt-2"),
        "{e}"
    );
    let e = refused(&llama3, &|_, t| {
        let half = ones_f32(3);
        t.retain(|(n, _)| n != "rope_freqs.weight");
        t.push(("rope_freqs.weight".into(), half));
    });
    assert!(
        e.contains("tensor `rope_freqs.weight` has shape [3], expected [8]"),
        "{e}"
    );
    let e = refused(&phi3, &|_, t| {
        let f = ones_f32(8);
        t.push(("rope_factors_long.weight".into(), f));
    });
    assert!(e.contains("LongRoPE"), "{e}");
    // A fused query/key/value matrix one head short.
    let e = refused(&phi3, &|_, t| {
        let (_, qkv) = t
            .iter_mut()
            .find(|(n, _)| n == "blk.0.attn_qkv.weight")
            .unwrap();
        // (Copied out: candle's quantize reads the storage, not the narrowed view.)
        let rows = qkv
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let short: Vec<f32> = rows[..112].concat();
        let short = Tensor::from_vec(short, (112, 64), &Device::Cpu).unwrap();
        *qkv = QTensor::quantize(&short, candle_core::quantized::GgmlDType::Q8_0).unwrap();
    });
    assert!(
        e.contains("tensor `blk.0.attn_qkv.weight` has shape [112, 64], expected [128, 64]"),
        "{e}"
    );
}
