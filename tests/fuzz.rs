//! Fuzzing on the stable toolchain: property tests (proptest) over every parser of untrusted
//! input swapd has. Each target feeds random and mutated inputs and asserts that the parser
//! returns (Ok or an error) without a panic, an abort or an allocation beyond
//! [`bound`]; a panic caught inside swapd (its loaders turn panics into errors as a last
//! resort) counts as a failure too. See FUZZ-NOTES.md for what each target covers.
//!
//! Cases per target: `SWAPD_FUZZ_CASES` (default 2000; the loading targets run a tenth of
//! that); seed: `SWAPD_FUZZ_SEED` (default random, printed); `SWAPD_FUZZ_BACKTRACE=1` keeps
//! panic backtraces (off by default: symbolizing one takes 100+ MB). The long run:
//! `SWAPD_FUZZ_CASES=250000 cargo test --release --test fuzz -- --nocapture`.
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner};

// ---------------------------------------------------------------------------------------
// A counting allocator: bytes live, the peak of bytes live, the largest single allocation.

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(live, Relaxed);
    LARGEST.fetch_max(size, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            // Counted as a new block first, then the old one freed: the peak sees both, as
            // it would when the block moves.
            grew(new);
            LIVE.fetch_sub(l.size(), Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Memory one case used: the peak of bytes live above where it started, and its largest
/// single allocation.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    peak: usize,
    largest: usize,
}

fn measure<T>(f: impl FnOnce() -> T) -> (T, Usage) {
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    LARGEST.store(0, Relaxed);
    let out = f();
    let usage = Usage {
        peak: PEAK.load(Relaxed).saturating_sub(base),
        largest: LARGEST.load(Relaxed),
    };
    (out, usage)
}

/// The most memory a case may take for an input of `len` bytes: 64 MiB for everything of
/// fixed size (buffers, the tokenizer and RoPE tables of a model load, the parsers' own
/// state), plus 16 bytes per input byte (the pre-reader refuses GGUF headers that would
/// expand more than that; text parsers expand a few times). An allocation sized from an
/// untrusted count or length (the bug class this looks for) asks for far more.
fn bound(len: usize) -> usize {
    (64 << 20) + 16 * len
}

/// The counters are global: one target at a time (each test holds this from its start, its
/// setup included).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        // With RUST_BACKTRACE set, candle attaches a backtrace to every error and prints it
        // in the message: symbolizing it loads this binary's debug info (over 100 MB, once)
        // and takes milliseconds per error. Errors are what most cases end in, so library
        // backtraces are off here (before any is captured; panics keep theirs).
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
        // The same for panics: the location and message only (proptest reports the
        // message of the failing case; `SWAPD_FUZZ_BACKTRACE=1` keeps the default hook).
        if std::env::var_os("SWAPD_FUZZ_BACKTRACE").is_none() {
            std::panic::set_hook(Box::new(|info| {
                let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                eprintln!("panic at {at}: {}", swapd::panic::message(info.payload()));
            }));
        }
    });
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------
// Running a target.

fn cases(divisor: u32) -> u32 {
    let n: u32 = std::env::var("SWAPD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    (n / divisor).max(1)
}

/// Per-target statistics, printed at the end.
#[derive(Default)]
struct Stats {
    cases: u64,
    ok: u64,
    max_peak: usize,
    max_peak_len: usize,
    max_largest: usize,
    /// Largest peak / input length, over inputs of 4 KiB or more (below that the fixed
    /// part dominates).
    max_ratio: f64,
}

impl Stats {
    fn note(&mut self, usage: Usage, len: usize, ok: bool) {
        self.cases += 1;
        self.ok += ok as u64;
        if usage.peak > self.max_peak {
            self.max_peak = usage.peak;
            self.max_peak_len = len;
        }
        self.max_largest = self.max_largest.max(usage.largest);
        if len >= 4096 {
            self.max_ratio = self.max_ratio.max(usage.peak as f64 / len as f64);
        }
    }
}

/// Runs `check` on `cases` inputs from `strategy`. `check` returns (accepted?, input
/// length, memory used) or a failure; a failing input is shrunk, written under
/// target/fuzz-findings/ and reported.
fn run<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    check: impl Fn(&S::Value) -> Result<(bool, usize, Usage), String>,
) where
    S::Value: std::fmt::Debug,
{
    let seed: u64 = std::env::var("SWAPD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let config = PtConfig {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        max_global_rejects: cases.saturating_mul(4),
        ..PtConfig::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng);
    let stats = std::cell::RefCell::new(Stats::default());
    let started = Instant::now();
    let result = runner.run(&strategy, |input| {
        let (ok, len, usage) = check(&input).map_err(TestCaseError::fail)?;
        if usage.peak > bound(len) {
            return Err(TestCaseError::fail(format!(
                "{} bytes live at the peak for a {len}-byte input (bound {})",
                usage.peak,
                bound(len)
            )));
        }
        stats.borrow_mut().note(usage, len, ok);
        Ok(())
    });
    let s = stats.borrow();
    println!(
        "fuzz {name}: {} cases ({} accepted) in {:.1} s, seed {seed}; peak {} B (input {} B), largest allocation {} B, peak/input up to {:.1}",
        s.cases,
        s.ok,
        started.elapsed().as_secs_f64(),
        s.max_peak,
        s.max_peak_len,
        s.max_largest,
        s.max_ratio
    );
    if let Err(e) = result {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-findings");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{name}-{seed}.txt"));
        let _ = std::fs::write(&file, format!("{e:#?}"));
        let text = format!("{e}");
        let short: String = text.chars().take(4000).collect();
        panic!(
            "fuzz target {name} failed (seed {seed}; full input in {}):\n{short}",
            file.display()
        );
    }
}

/// An error text that shows a panic caught inside swapd.
fn no_caught_panic(e: &str) -> Result<(), String> {
    if e.contains("panicked") {
        Err(format!("a panic was caught inside swapd: {e}"))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Mutations.

/// Values that break length and count fields.
fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(i64::MAX as u64),
        (0..64u32).prop_map(|k| 1u64 << k),
        (1..64u32).prop_map(|k| (1u64 << k) - 1),
        (0..63u32).prop_map(|k| (1u64 << k) + 1),
        0..4096u64,
        any::<u64>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: Index,
        bit: u8,
        head: bool,
    },
    Truncate(Index),
    /// Overwrite a numeric field of the header (known from a walk of the valid file).
    Field {
        which: Index,
        value: u64,
    },
    /// Overwrite 8 bytes anywhere in the header.
    Word {
        at: Index,
        value: u64,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Remove {
        at: Index,
        len: usize,
    },
    /// Copy a range over another place.
    Splice {
        from: Index,
        to: Index,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0..8u8, prop::bool::weighted(0.8))
            .prop_map(|(at, bit, head)| Mutation::Flip { at, bit, head }),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        4 => (any::<Index>(), interesting_u64()).prop_map(|(which, value)| Mutation::Field { which, value }),
        1 => (any::<Index>(), interesting_u64()).prop_map(|(at, value)| Mutation::Word { at, value }),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<Index>(), 1..64usize).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => (any::<Index>(), any::<Index>(), 1..256usize)
            .prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
    ]
}

/// A numeric field of a file's header: where and how wide.
#[derive(Debug, Clone, Copy)]
struct Field {
    at: usize,
    width: usize,
}

fn apply(base: &[u8], header_len: usize, fields: &[Field], ms: &[Mutation]) -> Vec<u8> {
    let mut b = base.to_vec();
    for m in ms {
        if b.is_empty() {
            break;
        }
        let head = header_len.min(b.len()).max(1);
        match m {
            Mutation::Flip { at, bit, head: h } => {
                let i = if *h {
                    at.index(head)
                } else {
                    at.index(b.len())
                };
                b[i] ^= 1 << bit;
            }
            Mutation::Truncate(at) => b.truncate(at.index(b.len())),
            Mutation::Field { which, value } => {
                if let Some(f) = fields.get(which.index(fields.len().max(1))) {
                    if f.at + f.width <= b.len() {
                        b[f.at..f.at + f.width].copy_from_slice(&value.to_le_bytes()[..f.width]);
                    }
                }
            }
            Mutation::Word { at, value } => {
                let i = at.index(head);
                let n = 8.min(b.len() - i);
                b[i..i + n].copy_from_slice(&value.to_le_bytes()[..n]);
            }
            Mutation::Insert { at, bytes } => {
                let i = at.index(head + 1);
                b.splice(i..i, bytes.iter().copied());
            }
            Mutation::Remove { at, len } => {
                let i = at.index(head);
                let j = (i + len).min(b.len());
                b.drain(i..j);
            }
            Mutation::Splice { from, to, len } => {
                let (i, j) = (from.index(b.len()), to.index(head));
                let n = (*len).min(b.len() - i).min(b.len() - j);
                let chunk = b[i..i + n].to_vec();
                b[j..j + n].copy_from_slice(&chunk);
            }
        }
    }
    b
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..5)
}

// ---------------------------------------------------------------------------------------
// GGUF.

/// The tiny llama GGUF: its bytes, metadata and tensors.
struct Tiny {
    bytes: Vec<u8>,
    meta: Vec<(String, Value)>,
    tensors: Vec<(String, QTensor)>,
    fields: Vec<Field>,
    header_len: usize,
    _dir: tempfile::TempDir,
}

fn tiny() -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    swapd::model::synth::write_tiny_llama_gguf(&path, &Default::default()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut f = std::io::Cursor::new(&bytes);
    let ct = Content::read(&mut f).unwrap();
    let mut meta: Vec<(String, Value)> = ct.metadata.clone().into_iter().collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors: Vec<(String, QTensor)> = ct
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), ct.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let fields = gguf_fields(&bytes);
    let header_len = ct.tensor_data_offset as usize;
    Tiny {
        bytes,
        meta,
        tensors,
        fields,
        header_len,
        _dir: dir,
    }
}

/// The numeric fields of a valid GGUF v2/v3 header: counts, lengths, types, dimensions and
/// offsets (not the strings' bytes).
fn gguf_fields(b: &[u8]) -> Vec<Field> {
    let mut out = vec![
        Field { at: 4, width: 4 },
        Field { at: 8, width: 8 },
        Field { at: 16, width: 8 },
    ];
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap()) as usize;
    let (n_tensors, n_kv) = (u64_at(8), u64_at(16));
    let mut i = 24;
    fn value(b: &[u8], i: &mut usize, t: u32, out: &mut Vec<Field>) {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap()) as usize;
        match t {
            0 | 1 | 7 => *i += 1,
            2 | 3 => *i += 2,
            4..=6 => {
                out.push(Field { at: *i, width: 4 });
                *i += 4
            }
            10..=12 => {
                out.push(Field { at: *i, width: 8 });
                *i += 8
            }
            8 => {
                out.push(Field { at: *i, width: 8 });
                *i += 8 + u64_at(*i);
            }
            9 => {
                let et = u32_at(*i);
                out.push(Field { at: *i, width: 4 });
                out.push(Field {
                    at: *i + 4,
                    width: 8,
                });
                let n = u64_at(*i + 4);
                *i += 12;
                for _ in 0..n {
                    value(b, i, et, out);
                }
            }
            _ => unreachable!(),
        }
    }
    for _ in 0..n_kv {
        out.push(Field { at: i, width: 8 });
        i += 8 + u64_at(i);
        let t = u32_at(i);
        out.push(Field { at: i, width: 4 });
        i += 4;
        value(b, &mut i, t, &mut out);
    }
    for _ in 0..n_tensors {
        out.push(Field { at: i, width: 8 });
        i += 8 + u64_at(i);
        let n = u32_at(i) as usize;
        out.push(Field { at: i, width: 4 });
        i += 4;
        for _ in 0..n {
            out.push(Field { at: i, width: 8 });
            i += 8;
        }
        out.push(Field { at: i, width: 4 });
        out.push(Field {
            at: i + 4,
            width: 8,
        });
        i += 12;
    }
    out
}

/// Random GGUF values, extreme ones favoured.
fn gguf_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i16>().prop_map(Value::I16),
        interesting_u64().prop_map(|v| Value::U32(v as u32)),
        interesting_u64().prop_map(|v| Value::I32(v as i32)),
        interesting_u64().prop_map(Value::U64),
        interesting_u64().prop_map(|v| Value::I64(v as i64)),
        prop_oneof![
            any::<f32>(),
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(0.0f32),
            Just(-1.0f32),
            Just(1e-5f32),
            Just(1e30f32)
        ]
        .prop_map(Value::F32),
        any::<f64>().prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        "[a-z.]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 16, 8, |inner| {
        // GGUF arrays hold one type: repeat one value.
        (inner, 0..8usize).prop_map(|(v, n)| Value::Array(vec![v; n]))
    })
}

const LLAMA_KEYS: [&str; 16] = [
    "general.alignment",
    "general.architecture",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.block_count",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.dimension_count",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.expert_count",
    "llama.expert_used_count",
    "llama.vocab_size",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
];

/// A change to the tiny model's metadata or tensors, written back through candle's writer.
#[derive(Debug, Clone)]
enum Edit {
    Set(Index, Value),
    /// Small integers where the loader divides and sizes.
    SetSmall(Index, u32),
    Remove(Index),
    DropTensor(Index),
    /// Replace a tensor by zeros of another shape (F32, or Q8_0 when the row allows).
    Reshape(Index, Vec<usize>, bool),
    /// Keep only this many tokens (or add some).
    Tokens(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Index>(), gguf_value()).prop_map(|(i, v)| Edit::Set(i, v)),
        3 => (any::<Index>(), prop_oneof![0..5u32, Just(16), Just(32), Just(64), Just(128), Just(512), Just(u32::MAX)])
            .prop_map(|(i, v)| Edit::SetSmall(i, v)),
        1 => any::<Index>().prop_map(Edit::Remove),
        1 => any::<Index>().prop_map(Edit::DropTensor),
        1 => (any::<Index>(), prop::collection::vec(prop_oneof![Just(1usize), Just(16), Just(32), Just(64), Just(128), Just(271), 1..300usize], 1..3), any::<bool>())
            .prop_map(|(i, d, q)| Edit::Reshape(i, d, q)),
        1 => (200..300usize).prop_map(Edit::Tokens),
    ]
}

/// The tiny model with `edits` applied, as GGUF bytes.
fn edited(t: &Tiny, edits: &[Edit]) -> Vec<u8> {
    let mut meta = t.meta.clone();
    let mut replaced: Vec<(String, QTensor)> = Vec::new();
    let mut dropped: Vec<String> = Vec::new();
    let key = |i: &Index| LLAMA_KEYS[i.index(LLAMA_KEYS.len())].to_string();
    let set = |meta: &mut Vec<(String, Value)>, k: String, v: Value| {
        meta.retain(|(m, _)| *m != k);
        meta.push((k, v));
    };
    for e in edits {
        match e {
            Edit::Set(i, v) => set(&mut meta, key(i), v.clone()),
            Edit::SetSmall(i, v) => set(&mut meta, key(i), Value::U32(*v)),
            Edit::Remove(i) => {
                let k = key(i);
                meta.retain(|(m, _)| *m != k);
            }
            Edit::DropTensor(i) => dropped.push(t.tensors[i.index(t.tensors.len())].0.clone()),
            Edit::Reshape(i, dims, q) => {
                let name = t.tensors[i.index(t.tensors.len())].0.clone();
                let z = Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu).unwrap();
                let last = *dims.last().unwrap();
                let dtype = if *q && last % 32 == 0 {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::F32
                };
                replaced.retain(|(n, _)| *n != name);
                replaced.push((name, QTensor::quantize(&z, dtype).unwrap()));
            }
            Edit::Tokens(n) => {
                let (_, v) = meta
                    .iter()
                    .find(|(k, _)| k == "tokenizer.ggml.tokens")
                    .cloned()
                    .unwrap_or(("".into(), Value::Array(vec![])));
                if let Value::Array(mut toks) = v {
                    toks.truncate(*n);
                    while toks.len() < *n {
                        toks.push(Value::String(format!("extra{}", toks.len())));
                    }
                    set(
                        &mut meta,
                        "tokenizer.ggml.tokens".into(),
                        Value::Array(toks),
                    );
                }
            }
        }
    }
    let md: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = t
        .tensors
        .iter()
        .filter(|(n, _)| !dropped.contains(n))
        .map(|(n, q)| {
            let q = replaced
                .iter()
                .find(|(m, _)| m == n)
                .map(|(_, q)| q)
                .unwrap_or(q);
            (n.as_str(), q)
        })
        .collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &ts).unwrap();
    out.into_inner()
}

/// Random bytes, some starting like a GGUF header.
fn gguf_random() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (
            prop_oneof![Just(1u32), Just(2), Just(3), any::<u32>()],
            interesting_u64(),
            interesting_u64(),
            prop::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(v, t, k, rest)| {
                let mut b = b"GGUF".to_vec();
                b.extend(v.to_le_bytes());
                b.extend(t.to_le_bytes());
                b.extend(k.to_le_bytes());
                b.extend(rest);
                b
            }),
    ]
}

/// Writes `bytes` as `path` and runs the header path swapd uses: the pre-reader, then
/// `weight_bytes_of`. If the pre-reader accepts, candle's reader must too, with the same
/// tensor data offset.
fn header_case(path: &Path, bytes: &[u8]) -> Result<(bool, usize, Usage), String> {
    std::fs::write(path, bytes).map_err(|e| e.to_string())?;
    let (r, usage) = measure(|| -> Result<bool, String> {
        let mut f = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let checked = swapd::model::header::check_gguf_header(&mut f);
        let weights = swapd::model::llm::weight_bytes_of(path, true);
        match (&checked, &weights) {
            (Ok(h), Ok(_)) => {
                let ct = Content::read(&mut std::io::Cursor::new(bytes))
                    .map_err(|e| format!("pre-reader accepted, candle refused: {e}"))?;
                if ct.tensor_data_offset != h.tensor_data_offset {
                    return Err(format!(
                        "tensor data offset {} (pre-reader) vs {} (candle)",
                        h.tensor_data_offset, ct.tensor_data_offset
                    ));
                }
                Ok(true)
            }
            (Ok(_), Err(e)) => {
                no_caught_panic(e)?;
                Err(format!("pre-reader accepted, weight_bytes_of refused: {e}"))
            }
            (Err(a), Err(b)) => {
                no_caught_panic(b)?;
                if a != b {
                    return Err(format!("two reasons for one file: {a} / {b}"));
                }
                Ok(false)
            }
            (Err(e), Ok(_)) => Err(format!(
                "weight_bytes_of accepted what the pre-reader refused: {e}"
            )),
        }
    });
    Ok((r?, bytes.len(), usage))
}

#[test]
fn gguf_header_random_bytes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.gguf");
    run("gguf_header_random_bytes", cases(1), gguf_random(), |b| {
        header_case(&path, b)
    });
}

#[test]
fn gguf_header_mutated_tiny_model() {
    let _serial = serial();
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.gguf");
    let strategy = prop_oneof![
        3 => mutations().prop_map(|m| (m, vec![])),
        1 => (prop::collection::vec(mutation(), 0..3), prop::collection::vec(edit(), 1..4)),
    ];
    run(
        "gguf_header_mutated_tiny_model",
        cases(1),
        strategy,
        |(ms, edits)| {
            let base = if edits.is_empty() {
                t.bytes.clone()
            } else {
                edited(&t, edits)
            };
            let fields = if edits.is_empty() {
                t.fields.clone()
            } else {
                gguf_fields(&base)
            };
            let b = apply(&base, t.header_len, &fields, ms);
            header_case(&path, &b)
        },
    );
}

/// Loads mutated tiny models all the way: no panic, and a model that loads must serve a
/// forward pass (what the pre-flight would run).
#[test]
fn llama_load_mutated_tiny_model() {
    let _serial = serial();
    let t = tiny();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.gguf");
    let strategy = prop_oneof![
        3 => prop::collection::vec(edit(), 1..4).prop_map(|e| (vec![], e)),
        1 => mutations().prop_map(|m| (m, vec![])),
    ];
    run(
        "llama_load_mutated_tiny_model",
        cases(10),
        strategy,
        |(ms, edits)| {
            let base = if edits.is_empty() {
                t.bytes.clone()
            } else {
                edited(&t, edits)
            };
            let b = apply(&base, t.header_len, &t.fields, ms);
            std::fs::write(&path, &b).map_err(|e| e.to_string())?;
            let (r, usage) = measure(|| -> Result<bool, String> {
                match swapd::model::Llm::load("m", &path, &Device::Cpu, 512) {
                    Err(e) => {
                        no_caught_panic(&e.to_string())?;
                        Ok(false)
                    }
                    Ok(llm) => {
                        let ids = llm
                            .tokenizer
                            .encode("Hello the world")
                            .map_err(|e| format!("encode: {e}"))?;
                        let ids = if ids.is_empty() { vec![0] } else { ids };
                        llm.next_logits(&ids)
                            .map_err(|e| format!("loaded, but a forward pass failed: {e}"))?;
                        Ok(true)
                    }
                }
            });
            Ok((r?, b.len(), usage))
        },
    );
}

// ---------------------------------------------------------------------------------------
// Safetensors and the BERT directory.

struct TinyBert {
    dir: tempfile::TempDir,
    st: Vec<u8>,
    config: serde_json::Value,
}

fn tiny_bert() -> TinyBert {
    let dir = tempfile::tempdir().unwrap();
    swapd::model::synth::write_tiny_bert(dir.path(), &Default::default()).unwrap();
    let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let config =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    TinyBert { dir, st, config }
}

fn json_number() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop_oneof![
        interesting_u64().prop_map(|v| json!(v)),
        any::<i64>().prop_map(|v| json!(v)),
        (0..600u64).prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
        Just(json!(-1)),
        Just(json!("x")),
        Just(json!(null)),
    ]
}

/// A change to a safetensors header's JSON.
#[derive(Debug, Clone)]
enum StEdit {
    Dtype(Index, String),
    Shape(Index, Vec<u64>),
    Offsets(Index, u64, u64),
    Remove(Index),
    Field(Index, String, serde_json::Value),
    Metadata(serde_json::Value),
}

fn st_edit() -> impl Strategy<Value = StEdit> {
    let dtypes = prop::sample::select(vec![
        "F32", "F16", "BF16", "F64", "U8", "I8", "U16", "I16", "U32", "I32", "I64", "U64", "BOOL",
        "F4", "F6_E2M3", "F8_E4M3", "F8_E5M2", "C64", "", "f32",
    ]);
    prop_oneof![
        (any::<Index>(), dtypes).prop_map(|(i, d)| StEdit::Dtype(i, d.to_string())),
        (
            any::<Index>(),
            prop::collection::vec(interesting_u64(), 0..5)
        )
            .prop_map(|(i, s)| StEdit::Shape(i, s)),
        (any::<Index>(), interesting_u64(), interesting_u64())
            .prop_map(|(i, a, b)| StEdit::Offsets(i, a, b)),
        any::<Index>().prop_map(StEdit::Remove),
        (
            any::<Index>(),
            prop::sample::select(vec!["dtype", "shape", "data_offsets", "extra"]),
            json_number()
        )
            .prop_map(|(i, k, v)| StEdit::Field(i, k.to_string(), v)),
        json_number().prop_map(StEdit::Metadata),
    ]
}

/// The tiny BERT's safetensors with `edits` applied to its header.
fn st_edited(base: &[u8], edits: &[StEdit]) -> Vec<u8> {
    let n = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&base[8..8 + n]).unwrap();
    let names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    for e in edits {
        let pick = |i: &Index| names[i.index(names.len())].clone();
        match e {
            StEdit::Remove(i) => {
                header.remove(&pick(i));
            }
            StEdit::Dtype(i, _)
            | StEdit::Shape(i, _)
            | StEdit::Offsets(i, _, _)
            | StEdit::Field(i, _, _) => {
                let Some(t) = header.get_mut(&pick(i)).and_then(|t| t.as_object_mut()) else {
                    continue;
                };
                let (k, v): (&str, serde_json::Value) = match e {
                    StEdit::Dtype(_, d) => ("dtype", d.clone().into()),
                    StEdit::Shape(_, s) => ("shape", s.clone().into()),
                    StEdit::Offsets(_, a, b) => ("data_offsets", vec![*a, *b].into()),
                    StEdit::Field(_, k, v) => (k.as_str(), v.clone()),
                    _ => unreachable!(),
                };
                t.insert(k.to_string(), v);
            }
            StEdit::Metadata(v) => {
                header.insert("__metadata__".into(), v.clone());
            }
        }
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&base[8 + n..]);
    out
}

#[test]
fn safetensors_header() {
    let _serial = serial();
    let t = tiny_bert();
    let path = t.dir.path().join("f.safetensors");
    let n = u64::from_le_bytes(t.st[..8].try_into().unwrap()) as usize;
    let fields = vec![Field { at: 0, width: 8 }];
    let strategy = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(|b| (b, vec![], vec![])),
        2 => mutations().prop_map(|m| (vec![], m, vec![])),
        3 => (prop::collection::vec(mutation(), 0..2), prop::collection::vec(st_edit(), 1..4))
            .prop_map(|(m, e)| (vec![], m, e)),
    ];
    run(
        "safetensors_header",
        cases(1),
        strategy,
        |(raw, ms, edits)| {
            let b = if !raw.is_empty() {
                raw.clone()
            } else {
                let base = if edits.is_empty() {
                    t.st.clone()
                } else {
                    st_edited(&t.st, edits)
                };
                apply(&base, n + 8, &fields, ms)
            };
            std::fs::write(&path, &b).map_err(|e| e.to_string())?;
            let (r, usage) = measure(|| -> Result<bool, String> {
                let mut f = std::fs::File::open(&path).unwrap();
                let checked =
                    swapd::model::safetensors::check_safetensors_header(&mut f, b.len() as u64);
                let loaded = swapd::model::embed::read_safetensors(&path);
                match (checked, loaded) {
                    (Ok(_), Ok(_)) => Ok(true),
                    (Err(_), Err(e)) => {
                        no_caught_panic(&e)?;
                        Ok(false)
                    }
                    (Ok(_), Err(e)) => {
                        no_caught_panic(&e)?;
                        Err(format!("pre-check accepted, candle refused: {e}"))
                    }
                    (Err(e), Ok(_)) => {
                        Err(format!("candle accepted what the pre-check refused: {e}"))
                    }
                }
            });
            Ok((r?, b.len(), usage))
        },
    );
}

/// Loads the tiny BERT with a mutated config.json: no panic, and a model that loads embeds.
#[test]
fn bert_config_mutated() {
    let _serial = serial();
    let t = tiny_bert();
    let keys = prop::sample::select(vec![
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
        "layer_norm_eps",
        "pad_token_id",
        "hidden_act",
        "position_embedding_type",
    ]);
    let strategy = prop::collection::vec((keys, json_number()), 0..4);
    run("bert_config_mutated", cases(10), strategy, |edits| {
        let mut c = t.config.clone();
        for (k, v) in edits {
            c[*k] = v.clone();
        }
        let text = serde_json::to_vec(&c).unwrap();
        std::fs::write(t.dir.path().join("config.json"), &text).map_err(|e| e.to_string())?;
        let (r, usage) = measure(|| -> Result<bool, String> {
            match swapd::model::Embedder::load("e", t.dir.path(), &Device::Cpu, 64) {
                Err(e) => {
                    no_caught_panic(&e.to_string())?;
                    Ok(false)
                }
                Ok(m) => {
                    m.embed(&["hello world".into()])
                        .map_err(|e| format!("loaded, but embedding failed: {e}"))?;
                    Ok(true)
                }
            }
        });
        Ok((r?, text.len() + t.st.len(), usage))
    });
}

// ---------------------------------------------------------------------------------------
// Text formats: models.toml, the config file, committed.json.

fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        interesting_u64().prop_map(|v| toml::Value::Integer(v as i64)),
        any::<i64>().prop_map(toml::Value::Integer),
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(1e300),
            Just(-0.5)
        ]
        .prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        prop_oneof![
            "[a-z0-9_./:-]{0,24}",
            Just("../../etc/passwd".to_string()),
            Just("hf://org/repo/file.gguf".to_string()),
            Just("hf://".to_string()),
            Just("/abs/path".to_string()),
            Just("127.0.0.1:0".to_string()),
            Just("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".to_string()),
            Just("llm".to_string()),
            Just("embedding".to_string()),
            Just("info,swapd=debug".to_string()),
            ".{0,16}",
        ]
        .prop_map(toml::Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// A TOML table whose keys come mostly from `keys`, with random values.
fn toml_table(keys: Vec<&'static str>) -> impl Strategy<Value = toml::Table> {
    let key = prop_oneof![
        8 => prop::sample::select(keys).prop_map(String::from),
        1 => "[a-z_]{1,12}",
    ];
    prop::collection::vec((key, toml_value()), 0..10).prop_map(|kv| kv.into_iter().collect())
}

/// TOML text: generated, then sometimes mangled at the byte level.
fn toml_text(doc: impl Strategy<Value = toml::Table>) -> impl Strategy<Value = String> {
    (doc, prop::collection::vec(mutation(), 0..3)).prop_map(|(t, ms)| {
        let text = toml::to_string(&t).unwrap_or_default();
        if ms.is_empty() {
            text
        } else {
            let b = apply(text.as_bytes(), text.len(), &[], &ms);
            String::from_utf8_lossy(&b).into_owned()
        }
    })
}

/// A change to one key of a model entry (`table` 0) or of its `defaults` (1), `preflight`
/// (2) or `sha256` (3) table: a random value, or removed (`None`).
#[derive(Debug, Clone)]
struct Perturb {
    table: usize,
    key: Index,
    value: Option<toml::Value>,
}

const MANIFEST_KEYS: [&[&str]; 4] = [
    &[
        "name",
        "kind",
        "source",
        "sha256",
        "defaults",
        "preflight",
        "fetch",
        "extra",
    ],
    &[
        "context_length",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "repetition_last_n",
        "extra",
    ],
    &[
        "prompts",
        "max_tokens",
        "latency_budget_ms",
        "golden",
        "texts",
        "extra",
    ],
    &["a.gguf", "model.safetensors", "config.json", ""],
];

/// Manifests of valid model entries, some of their keys then changed or removed.
fn manifest_doc() -> impl Strategy<Value = toml::Table> {
    let entry = (
        "[a-z0-9_.-]{1,8}",
        prop::sample::select(vec!["llm", "embedding"]),
        prop::sample::select(vec![
            "m/a.gguf",
            "m",
            "hf://org/repo/a.gguf",
            "hf://org/repo",
        ]),
        "[0-9a-f]{64}",
        (2..100_000i64, 1..4096i64, 0.0..2.0f64, 0.01..=1.0f64),
        prop::collection::vec(
            (
                0..4usize,
                any::<Index>(),
                prop::option::weighted(0.8, toml_value()),
            )
                .prop_map(|(table, key, value)| Perturb { table, key, value }),
            0..4,
        ),
    )
        .prop_map(
            |(name, kind, source, sha, (ctx, max, temp, top_p), perturbs)| {
                let mut m = toml::Table::new();
                m.insert("name".into(), name.into());
                m.insert("kind".into(), kind.into());
                m.insert("source".into(), source.into());
                let mut sha256 = toml::Table::new();
                sha256.insert("a.gguf".into(), sha.into());
                m.insert("sha256".into(), sha256.into());
                let mut d = toml::Table::new();
                d.insert("context_length".into(), ctx.into());
                d.insert("max_tokens".into(), max.into());
                d.insert("temperature".into(), temp.into());
                d.insert("top_p".into(), top_p.into());
                m.insert("defaults".into(), d.into());
                m.insert("preflight".into(), toml::Table::new().into());
                for p in perturbs {
                    let keys = MANIFEST_KEYS[p.table];
                    let key = keys[p.key.index(keys.len())].to_string();
                    let sub = ["", "defaults", "preflight", "sha256"][p.table];
                    let t = if p.table == 0 {
                        &mut m
                    } else {
                        match m.get_mut(sub).and_then(|v| v.as_table_mut()) {
                            Some(t) => t,
                            None => continue,
                        }
                    };
                    match p.value {
                        Some(v) => t.insert(key, v),
                        None => t.remove(&key),
                    };
                }
                m
            },
        );
    prop::collection::vec(entry, 0..4).prop_map(|models| {
        let mut t = toml::Table::new();
        t.insert(
            "model".into(),
            toml::Value::Array(models.into_iter().map(toml::Value::Table).collect()),
        );
        t
    })
}

#[test]
fn manifest_parsing() {
    let _serial = serial();
    let strategy = prop_oneof![
        4 => toml_text(manifest_doc()),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    run("manifest_parsing", cases(1), strategy, |text| {
        let (r, usage) = measure(|| swapd::manifest::Manifest::parse(Path::new("m.toml"), text));
        Ok((r.is_ok(), text.len(), usage))
    });
}

const CONFIG_KEYS: [&str; 27] = [
    "listen",
    "control_listen",
    "models_root",
    "manifest",
    "models",
    "device",
    "max_concurrent",
    "max_queue",
    "max_request_bytes",
    "max_embed_batch",
    "hf_cache",
    "hf_offline",
    "log_format",
    "log_level",
    "metrics_listen",
    "shutdown_grace_secs",
    "admin_token",
    "control_auth",
    "state_dir",
    "manifest_poll_secs",
    "reload_failure_limit",
    "reload_cooldown_secs",
    "memory_budget_bytes",
    "memory_policy",
    "auto_rollback_window_secs",
    "auto_rollback_error_rate",
    "auto_rollback_min_requests",
];

/// A value of the type `key` takes in the config file (extreme ones favoured), or now and
/// then any value.
fn config_value(key: &'static str) -> BoxedStrategy<toml::Value> {
    use toml::Value as T;
    let strings = |v: Vec<&'static str>| {
        prop_oneof![
            4 => prop::sample::select(v).prop_map(|s| T::String(s.into())),
            1 => ".{0,12}".prop_map(T::String),
        ]
        .boxed()
    };
    let typed = match key {
        "listen" | "control_listen" | "metrics_listen" => strings(vec![
            "127.0.0.1:0",
            "0.0.0.0:50051",
            "[::1]:0",
            "localhost:1",
            "127.0.0.1:99999",
            "",
        ]),
        "models_root" | "manifest" | "hf_cache" | "state_dir" => strings(vec![
            "models",
            "models/models.toml",
            "nope.toml",
            "",
            "/",
            "..",
        ]),
        "models" => prop::collection::vec(prop::sample::select(vec!["a", "b", ""]), 0..3)
            .prop_map(|v| T::Array(v.into_iter().map(|s| T::String(s.into())).collect()))
            .boxed(),
        "device" => strings(vec![
            "cpu",
            "auto",
            "cuda",
            "cuda:0",
            "cuda:99999999999",
            "cuda:-1",
            "gpu",
        ]),
        "log_format" => strings(vec!["text", "json", "xml"]),
        "log_level" => strings(vec![
            "info",
            "debug",
            "info,swapd=debug",
            "swapd[span{a=1}]=trace",
            "=",
            "[[[",
        ]),
        "memory_policy" => strings(vec!["refuse", "resource-preserving", "default", "x"]),
        "admin_token" => ".{0,8}".prop_map(T::String).boxed(),
        "hf_offline" | "control_auth" => any::<bool>().prop_map(T::Boolean).boxed(),
        "shutdown_grace_secs" | "auto_rollback_window_secs" | "auto_rollback_error_rate" => {
            prop_oneof![
                Just(0.0f64),
                Just(0.5),
                Just(30.0),
                Just(1e300),
                Just(1.8e19),
                Just(f64::MAX),
                Just(-1.0),
                Just(f64::NAN),
                Just(f64::INFINITY),
                any::<f64>(),
            ]
            .prop_map(T::Float)
            .boxed()
        }
        _ => interesting_u64().prop_map(|v| T::Integer(v as i64)).boxed(),
    };
    prop_oneof![9 => typed, 1 => toml_value()].boxed()
}

/// Config files whose keys mostly hold values of the right type.
fn config_doc() -> impl Strategy<Value = toml::Table> {
    prop::collection::vec(
        prop::sample::select(CONFIG_KEYS.to_vec()).prop_flat_map(|k| (Just(k), config_value(k))),
        0..8,
    )
    .prop_map(|kv| kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// The config file through `Config::check` (the entry point `swapd serve` and `swapd config
/// check` use), with a valid models root and manifest beside it.
#[test]
fn config_file_parsing() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("models.toml"),
        "[[model]]\nname = \"a\"\nkind = \"llm\"\nsource = \"a/a.gguf\"\n[model.sha256]\n\"a.gguf\" = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\n",
    )
    .unwrap();
    let path = dir.path().join("swapd.toml");
    let strategy = prop_oneof![
        4 => toml_text(config_doc()),
        1 => toml_text(toml_table(CONFIG_KEYS.to_vec())),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    run("config_file_parsing", cases(1), strategy, |text| {
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let args = swapd::config::ServeArgs {
            config: Some(path.clone()),
            models_root: Some(root.clone()),
            ..Default::default()
        };
        let (r, usage) = measure(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                swapd::config::Config::check(&args)
            }))
        });
        match r {
            Ok(r) => Ok((r.is_ok(), text.len(), usage)),
            Err(p) => Err(format!("Config::check panicked: {}", panic_message(&p))),
        }
    });
}

/// Found by `config_file_parsing` in the long run: `log_level = "\ta\u{e000}="` panics
/// inside `EnvFilter::try_new` (tracing-subscriber 0.3.23's `Directive::parse` walks
/// `from.trim()` but slices `from`). It must be a config error naming the key (or be
/// accepted, trimmed): `config::log_filter` trims each directive and catches the panic.
#[test]
fn regression_config_log_level_leading_space() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("models.toml"),
        "[[model]]\nname = \"a\"\nkind = \"llm\"\nsource = \"a/a.gguf\"\n[model.sha256]\n\"a.gguf\" = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\n",
    )
    .unwrap();
    let path = dir.path().join("swapd.toml");
    // Each comma-separated directive is parsed on its own: a leading space after a comma
    // counts too.
    for level in ["\\ta\\ue000=", "info,\\ta\\ue000=", "info, b\\u00e9="] {
        std::fs::write(&path, format!("log_level = \"{level}\"\n")).unwrap();
        let args = swapd::config::ServeArgs {
            config: Some(path.clone()),
            models_root: Some(root.clone()),
            ..Default::default()
        };
        match std::panic::catch_unwind(|| swapd::config::Config::check(&args)) {
            Ok(Ok(_)) => {}
            Ok(Err(errors)) => assert!(
                errors.iter().any(|e| e.to_string().contains("log_level")),
                "{level}: {errors:?}"
            ),
            Err(p) => panic!(
                "log_level = \"{level}\": Config::check panicked: {}",
                panic_message(&p)
            ),
        }
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    swapd::panic::message(p.as_ref())
}

/// Found by `config_file_parsing`: `shutdown_grace_secs` (or `auto_rollback_window_secs`)
/// larger than a `Duration` holds passed the `>= 0` check, then `Duration::from_secs_f64`
/// panicked. It must be a config error naming the key.
#[test]
fn regression_config_huge_seconds() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(
        root.join("models.toml"),
        "[[model]]\nname = \"a\"\nkind = \"llm\"\nsource = \"a/a.gguf\"\n[model.sha256]\n\"a.gguf\" = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\n",
    )
    .unwrap();
    for key in ["shutdown_grace_secs", "auto_rollback_window_secs"] {
        let path = dir.path().join("swapd.toml");
        std::fs::write(&path, format!("{key} = 1e300\n")).unwrap();
        let args = swapd::config::ServeArgs {
            config: Some(path.clone()),
            models_root: Some(root.clone()),
            ..Default::default()
        };
        let r = std::panic::catch_unwind(|| swapd::config::Config::check(&args));
        let errors = match r {
            Ok(r) => r.expect_err("1e300 seconds accepted"),
            Err(p) => panic!(
                "{key} = 1e300: Config::check panicked: {}",
                panic_message(&p)
            ),
        };
        assert!(
            errors.iter().any(|e| e.to_string().contains(key)),
            "{errors:?}"
        );
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value as J;
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        interesting_u64().prop_map(J::from),
        any::<i64>().prop_map(J::from),
        any::<f64>().prop_map(J::from),
        "[a-z0-9]{0,16}".prop_map(J::String),
        "[0-9a-f]{64}".prop_map(J::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(J::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(vec![
                        "source",
                        "sha256",
                        "version",
                        "generation",
                        "committed_at_unix_ms",
                        "a.gguf",
                    ])
                    .prop_map(String::from),
                    "[a-z]{1,8}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| J::Object(m.into_iter().collect())),
        ]
    })
}

/// A committed.json-shaped document: model name → entry, entries mostly well-formed.
fn committed_doc() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    let entry = (
        json_value(),
        prop::collection::btree_map("[a-z.]{1,8}", "[0-9a-f]{64}", 0..3),
        "[0-9a-f]{16}",
        interesting_u64(),
        any::<i64>(),
        0..12usize,
        prop::option::weighted(0.2, json_value()),
    )
        .prop_map(|(source, sha, version, generation, at, broken, junk)| {
            let mut e = json!({
                "source": "m/m.gguf", "sha256": sha, "version": version,
                "generation": generation, "committed_at_unix_ms": at,
            });
            let keys = [
                "source",
                "sha256",
                "version",
                "generation",
                "committed_at_unix_ms",
            ];
            if broken < keys.len() {
                e[keys[broken]] = source;
            }
            if let Some(serde_json::Value::Object(m)) = &junk {
                for (k, v) in m {
                    e[k] = v.clone();
                }
            }
            e
        });
    prop_oneof![
        4 => prop::collection::btree_map("[a-z0-9_.-]{1,8}", entry, 0..4)
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        1 => json_value(),
    ]
}

#[test]
fn committed_json_parsing() {
    let _serial = serial();
    let strategy = prop_oneof![
        4 => (committed_doc(), prop::collection::vec(mutation(), 0..3)).prop_map(|(d, ms)| {
            let b = serde_json::to_vec_pretty(&d).unwrap();
            if ms.is_empty() { b } else { let n = b.len(); apply(&b, n, &[], &ms) }
        }),
        1 => prop::collection::vec(any::<u8>(), 0..512),
        // Deep nesting.
        1 => (1..100_000usize, prop::sample::select(vec![b'[', b'{'])).prop_map(|(n, c)| vec![c; n]),
    ];
    run("committed_json_parsing", cases(1), strategy, |bytes| {
        let (r, usage) = measure(|| swapd::registry::persist::parse_committed(bytes));
        if let Ok(m) = &r {
            // What parses must write back and parse to the same map.
            let again = serde_json::to_vec(m).unwrap();
            let back = swapd::registry::persist::parse_committed(&again)?;
            if &back != m {
                return Err("committed.json does not round-trip".into());
            }
        }
        Ok((r.is_ok(), bytes.len(), usage))
    });
}

// ---------------------------------------------------------------------------------------
// Known findings, kept as plain regression tests.

/// The case that started this: candle's reader divides by `general.alignment`.
#[test]
fn regression_alignment_zero() {
    let _serial = serial();
    let t = tiny();
    let b = edited(&t, &[Edit::Set(zero_index(), Value::U32(0))]);
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("a0.gguf");
    std::fs::write(&path, &b).unwrap();
    let e = swapd::model::llm::weight_bytes_of(&path, true).unwrap_err();
    assert!(e.contains("general.alignment is 0"), "{e}");
}

/// An `Index` that picks the first element (`LLAMA_KEYS[0]` is `general.alignment`).
fn zero_index() -> Index {
    let mut runner = TestRunner::deterministic();
    (any::<Index>(), Just(()))
        .prop_filter("first", |(i, _)| i.index(LLAMA_KEYS.len()) == 0)
        .new_tree(&mut runner)
        .unwrap()
        .current()
        .0
}
