//! qwen2 and qwen3 (the llama layout with query/key/value biases, or per-head query/key norms
//! and a head size that is not dim / heads; NEOX RoPE) on tiny random-weight GGUFs that swapd
//! writes deterministically, against llama.cpp's logits and greedy ids for the same files
//! (`tests/fixtures/synth-llamacpp-reference.json`, made by `scripts/peers/synth_fixtures.py`)
//! and against candle-transformers' `quantized_qwen2` / `quantized_qwen3`.
use candle_core::{Device, Tensor};
use serde::Deserialize;
use swapd::model::synth::{write_tiny_llama_gguf, TinyLlm, Variant};

/// Below this top-1 minus top-2 margin a greedy step is a near-tie.
const NEAR_TIE: f32 = 0.2;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
    texts: Vec<Text>,
}

#[derive(Deserialize)]
struct Text {
    arch: String,
    text: String,
    ids: Vec<u32>,
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

fn variant(arch: &str) -> Variant {
    match arch {
        "qwen2" => Variant::Qwen2,
        "qwen3" => Variant::Qwen3,
        other => panic!("no variant {other}"),
    }
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap() as u32
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn qwen2_and_qwen3_agree_with_llama_cpp_and_candle() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("fixtures/synth-llamacpp-reference.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for t in &fixture.texts {
        let path = dir.path().join(format!("tok-{}.gguf", t.arch));
        let opts = TinyLlm {
            seed: 1,
            variant: variant(&t.arch),
            ..Default::default()
        };
        write_tiny_llama_gguf(&path, &opts).unwrap();
        let llm = swapd::model::Llm::load(&t.arch, &path, &Device::Cpu, 256).unwrap();
        assert_eq!(
            llm.tokenizer.encode(&t.text).unwrap(),
            t.ids,
            "{}: ids of {:?} (pre-tokenizer `{}`)",
            t.arch,
            t.text,
            llm.tokenizer.pre
        );
    }
    for c in &fixture.cases {
        let path = dir.path().join(format!("{}.gguf", c.arch));
        write_tiny_llama_gguf(
            &path,
            &TinyLlm {
                seed: 1,
                variant: variant(&c.arch),
                ..Default::default()
            },
        )
        .unwrap();
        let (sha, _) = swapd::model::verify::sha256_file(&path).unwrap();
        assert_eq!(
            sha, c.sha256,
            "{}: the synthetic file changed; regenerate the fixture",
            c.arch
        );
        let llm = swapd::model::Llm::load(&c.arch, &path, &Device::Cpu, 256).unwrap();

        // Next-token logits after the prompt: llama.cpp's, and candle's implementation.
        let ours = llm.next_logits(&c.prompt_ids).unwrap();
        let d_llama = max_diff(&ours, &c.logits);
        let mut f = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let x = Tensor::new(c.prompt_ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let theirs: Vec<f32> = match c.arch.as_str() {
            "qwen2" => {
                use candle_transformers::models::quantized_qwen2::ModelWeights;
                let mut m = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
                m.forward(&x, 0).unwrap()
            }
            _ => {
                use candle_transformers::models::quantized_qwen3::ModelWeights;
                let mut m = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
                m.forward(&x, 0).unwrap()
            }
        }
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        let d_candle = max_diff(&ours, &theirs);
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
                argmax(&ours),
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
