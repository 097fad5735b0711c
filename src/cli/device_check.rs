//! `swapd bench synth` and `swapd bench parity`: the pieces of scripts/gpu-device.sh that
//! need swapd's own code on the lent GPU machine, where no model file and no Rust toolchain
//! travel: random-weight models written there, and the same model's logits on the device
//! against the CPU's.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use crate::device::DeviceRequest;
use crate::model::kv::StepItem;
use crate::model::synth::{self, LlmShape, TinyBert, TinyLlm};
use crate::model::Llm;

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Folder to write: models.toml, llm/v1.gguf … llm/vN.gguf and embed/ (a tiny BERT).
    pub out: PathBuf,
    /// `tiny` (2 layers of 64) or `smollm2` (SmolLM2-135M's 30 layers of 576, Q8_0).
    #[arg(long, default_value = "tiny")]
    pub shape: String,
    /// LLM versions to write (different seeds); the manifest serves v1.
    #[arg(long, default_value_t = 3)]
    pub versions: usize,
    /// The LLMs' architecture: `llama`, `qwen2` (q/k/v biases), `qwen3` (q/k norms), `phi3`
    /// (fused projections, SentencePiece vocabulary) or `llama3` (RoPE factors, `llama-bpe`).
    #[arg(long, default_value = "llama")]
    pub arch: String,
}

/// Writes the models and prints, as JSON, each LLM version's source and sha256 (what a
/// reload names).
pub fn synth(a: SynthArgs) -> Result<ExitCode> {
    let shape = match a.shape.as_str() {
        "tiny" => LlmShape::default(),
        "smollm2" => LlmShape::smollm2(),
        other => bail!("--shape {other}: expected tiny or smollm2"),
    };
    let Some(variant) = synth::Variant::from_name(&a.arch) else {
        let names: Vec<&str> = synth::Variant::ALL.iter().map(|v| v.name()).collect();
        bail!("--arch {}: expected one of {}", a.arch, names.join(", "));
    };
    if !(1..=16).contains(&a.versions) {
        bail!("--versions {}: between 1 and 16", a.versions);
    }
    let llm_dir = a.out.join("llm");
    std::fs::create_dir_all(&llm_dir).with_context(|| format!("creating {}", llm_dir.display()))?;
    let sha = |p: &std::path::Path| {
        crate::model::verify::sha256_file(p)
            .map(|(s, _)| s)
            .with_context(|| format!("hashing {}", p.display()))
    };
    let mut versions = Vec::new();
    for v in 1..=a.versions {
        let file = format!("v{v}.gguf");
        let path = llm_dir.join(&file);
        let opts = TinyLlm {
            seed: v as u64,
            shape,
            variant,
            ..Default::default()
        };
        synth::write_tiny_llama_gguf(&path, &opts)
            .with_context(|| format!("writing {}", path.display()))?;
        versions.push(serde_json::json!({
            "source": format!("llm/{file}"), "file": file, "sha256": sha(&path)?,
            "bytes": std::fs::metadata(&path)?.len(),
        }));
    }
    let bert = a.out.join("embed");
    synth::write_tiny_bert(&bert, &TinyBert::default())?;
    let manifest = format!(
        "[[model]]\nname = \"llm\"\nkind = \"llm\"\nsource = \"llm/v1.gguf\"\n[model.sha256]\n\
         \"v1.gguf\" = \"{}\"\n[model.defaults]\ncontext_length = 512\n\n\
         [[model]]\nname = \"embed\"\nkind = \"embedding\"\nsource = \"embed\"\n[model.sha256]\n\
         \"config.json\" = \"{}\"\n\"model.safetensors\" = \"{}\"\n\"tokenizer.json\" = \"{}\"\n\
         [model.defaults]\ncontext_length = 64\n",
        versions[0]["sha256"].as_str().unwrap_or_default(),
        sha(&bert.join("config.json"))?,
        sha(&bert.join("model.safetensors"))?,
        sha(&bert.join("tokenizer.json"))?,
    );
    std::fs::write(a.out.join("models.toml"), manifest)?;
    let report = serde_json::json!({ "shape": a.shape, "llm": versions });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct ParityArgs {
    /// The GGUF to load on the CPU and on --device.
    #[arg(long)]
    pub gguf: PathBuf,
    #[arg(long, default_value = "cuda")]
    pub device: DeviceRequest,
    /// Greedy steps after each prompt.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Prompts (repeatable) [default: three short ones].
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Largest |logit difference| allowed, as a fraction of the CPU logits' range.
    #[arg(long, default_value_t = 0.02)]
    pub tolerance: f32,
    /// A top-1 disagreement where the CPU's top two are closer than this is a near-tie, not
    /// a failure (both sides quantize activations to 8 bits, differently).
    #[arg(long, default_value_t = 0.2)]
    pub near_tie: f32,
}

fn vec_of(t: Option<Tensor>) -> Result<Vec<f32>> {
    let t = t.context("no logits")?;
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

fn argmax_margin(v: &[f32]) -> (u32, f32) {
    let (mut best, mut second) = ((0usize, f32::NEG_INFINITY), f32::NEG_INFINITY);
    for (i, &x) in v.iter().enumerate() {
        if x > best.1 {
            second = best.1;
            best = (i, x);
        } else if x > second {
            second = x;
        }
    }
    (best.0 as u32, best.1 - second)
}

/// The largest |a - b| and that as a fraction of `a`'s range.
fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    let max_abs = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let (lo, hi) = a
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    (max_abs, max_abs / (hi - lo).max(1e-6))
}

/// Loads the GGUF on the CPU and on the device; along each prompt's CPU greedy path (both
/// fed the CPU's token, so one near-tie does not make every later step incomparable)
/// compares the logits, and runs the prompts as one batch on the device against each alone
/// there. Prints JSON; exits 1 when a difference passes the tolerance or the top token
/// differs away from a near-tie.
pub fn parity(a: ParityArgs) -> Result<ExitCode> {
    let (device, why_cpu) = crate::device::open(a.device).map_err(anyhow::Error::msg)?;
    if let Some(why) = why_cpu {
        eprintln!(
            "parity: --device {:?} fell back to the CPU: {why}",
            a.device
        );
    }
    let on = device.for_new_version();
    let cpu = Llm::load("cpu", &a.gguf, &candle_core::Device::Cpu, 512)?;
    let dev = Llm::load("device", &a.gguf, on.candle(), 512)?;
    let prompts = if a.prompt.is_empty() {
        vec![
            "The quick brown fox".to_string(),
            "hello world, the model".to_string(),
            "<|im_start|>user\nwho are you?<|im_end|>\n".to_string(),
        ]
    } else {
        a.prompt.clone()
    };
    let (mut worst_abs, mut worst_rel) = (0.0f32, 0.0f32);
    let (mut agree, mut near_ties, mut disagree) = (0usize, 0usize, Vec::new());
    let mut per_prompt = Vec::new();
    let mut prompt_ids = Vec::new();
    for p in &prompts {
        let ids = cpu.tokenizer.encode(p).map_err(anyhow::Error::msg)?;
        prompt_ids.push(ids.clone());
        let (mut sc, mut sd) = (cpu.session(), dev.session());
        let mut lc = vec_of(sc.feed(&ids, &mut || true)?)?;
        let mut ld = vec_of(sd.feed(&ids, &mut || true)?)?;
        let (mut cpu_tokens, mut dev_tokens) = (Vec::new(), Vec::new());
        for step in 0..a.steps {
            let (abs, rel) = diff(&lc, &ld);
            worst_abs = worst_abs.max(abs);
            worst_rel = worst_rel.max(rel);
            let ((tc, margin), (td, _)) = (argmax_margin(&lc), argmax_margin(&ld));
            cpu_tokens.push(tc);
            dev_tokens.push(td);
            match (tc == td, margin < a.near_tie) {
                (true, _) => agree += 1,
                (false, true) => near_ties += 1,
                (false, false) => disagree.push(serde_json::json!({
                    "prompt": p, "step": step, "cpu": tc, "device": td, "cpu_margin": margin,
                })),
            }
            lc = vec_of(sc.feed(&[tc], &mut || true)?)?;
            ld = vec_of(sd.feed(&[tc], &mut || true)?)?;
        }
        per_prompt.push(serde_json::json!({
            "prompt": p, "cpu_tokens": cpu_tokens, "device_tokens": dev_tokens,
        }));
    }
    let batch = batch_vs_alone(&dev, &prompt_ids, a.steps.min(8))?;
    let pass = worst_rel <= a.tolerance && disagree.is_empty() && batch.1 <= a.tolerance;
    let report = serde_json::json!({
        "device": on.label(), "gguf": a.gguf, "steps_per_prompt": a.steps,
        "tolerance_rel": a.tolerance, "near_tie": a.near_tie,
        "max_abs_diff": worst_abs, "max_rel_diff": worst_rel,
        "top1_agree": agree, "top1_near_ties": near_ties, "top1_disagree": disagree,
        "batched_vs_alone_on_device": { "max_abs_diff": batch.0, "max_rel_diff": batch.1 },
        "prompts": per_prompt, "pass": pass,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The prompts prefilled and decoded `steps` tokens as one batch on the model's device,
/// against each alone there: (max abs, max relative) difference of the logits.
fn batch_vs_alone(llm: &Llm, prompts: &[Vec<u32>], steps: usize) -> Result<(f32, f32)> {
    // Alone: each prompt's greedy path and logits at each step.
    let mut alone = Vec::new();
    for ids in prompts {
        let mut s = llm.session();
        let mut l = vec_of(s.feed(ids, &mut || true)?)?;
        let mut path = vec![l.clone()];
        for _ in 0..steps {
            l = vec_of(s.feed(&[argmax_margin(&l).0], &mut || true)?)?;
            path.push(l.clone());
        }
        alone.push(path);
    }
    // Together, fed the same tokens.
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|_| llm.new_cache(longest + steps + 1))
        .collect();
    let (mut worst_abs, mut worst_rel) = (0.0f32, 0.0f32);
    for step in 0..=steps {
        let inputs: Vec<Vec<u32>> = (0..prompts.len())
            .map(|i| match step {
                0 => prompts[i].clone(),
                _ => vec![argmax_margin(&alone[i][step - 1]).0],
            })
            .collect();
        let mut items: Vec<StepItem<'_>> = caches
            .iter_mut()
            .zip(&inputs)
            .map(|(cache, ids)| StepItem {
                ids,
                cache,
                logits: true,
            })
            .collect();
        let out = llm.step(&mut items)?;
        for (i, l) in out.into_iter().enumerate() {
            let (abs, rel) = diff(&alone[i][step], &vec_of(l)?);
            worst_abs = worst_abs.max(abs);
            worst_rel = worst_rel.max(rel);
        }
    }
    Ok((worst_abs, worst_rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margins_and_differences() {
        assert_eq!(argmax_margin(&[0.1, 2.0, 1.5, -3.0]), (1, 0.5));
        assert_eq!(argmax_margin(&[5.0, 1.0]), (0, 4.0));
        let (abs, rel) = diff(&[0.0, 10.0], &[0.5, 10.0]);
        assert_eq!((abs, rel), (0.5, 0.05));
    }

    #[test]
    fn synthetic_models_load_and_agree_with_themselves_on_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m");
        synth(SynthArgs {
            out: out.clone(),
            shape: "tiny".into(),
            versions: 2,
            arch: "llama".into(),
        })
        .unwrap();
        let manifest = std::fs::read_to_string(out.join("models.toml")).unwrap();
        let sha = crate::model::verify::sha256_file(&out.join("llm/v1.gguf"))
            .unwrap()
            .0;
        assert!(manifest.contains(&sha), "{manifest}");
        let llm = Llm::load(
            "m",
            &out.join("llm/v2.gguf"),
            &candle_core::Device::Cpu,
            512,
        )
        .unwrap();
        let ids = llm.tokenizer.encode("hello the world").unwrap();
        // On the CPU a batch is bit-identical to each sequence alone.
        assert_eq!(
            batch_vs_alone(&llm, &[ids.clone(), ids[..2].to_vec()], 4).unwrap(),
            (0.0, 0.0)
        );
        let code = parity(ParityArgs {
            gguf: out.join("llm/v1.gguf"),
            device: DeviceRequest::Cpu,
            steps: 4,
            prompt: vec![],
            tolerance: 0.0,
            near_tie: 0.2,
        })
        .unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
    }
}
