use super::*;

/// RoPE tables for `pairs` (position, pair) entries at angle `step · i` for entry `i`.
fn rope_table(pairs: usize, step: f32) -> Rope {
    Rope {
        cos: (0..pairs).map(|i| (i as f32 * step).cos()).collect(),
        sin: (0..pairs).map(|i| (i as f32 * step).sin()).collect(),
        neox: true,
    }
}

/// The same attention computed naively in f64 from the rotated, rounded values.
#[test]
fn matches_an_f64_reference_with_grouped_heads_and_a_chunk() {
    let h = Heads {
        n_head: 4,
        n_kv_head: 2,
        head_dim: 8,
    };
    let half = 4;
    let positions = 16;
    let rope = rope_table(positions * half, 0.1);
    let val = |i: usize| ((i * 37 % 101) as f32 / 50.0) - 1.0;
    let (qw, kw) = (32, 16);
    let mut cache = LayerKv::default();
    let mut all_k = Vec::new();
    let mut all_v = Vec::new();
    let mut pos = 0;
    // Three tokens, then a chunk of two.
    for n in [1, 1, 1, 2] {
        let q: Vec<f32> = (0..n * qw).map(|i| val(i + 7 * pos)).collect();
        let k: Vec<f32> = (0..n * kw).map(|i| val(i * 3 + pos)).collect();
        let v: Vec<f32> = (0..n * kw).map(|i| val(i * 5 + 11 * pos)).collect();
        let mut out = vec![0f32; n * qw];
        attend(
            h,
            Span::causal(8),
            &rope,
            &q,
            &k,
            &v,
            n,
            pos,
            &mut cache,
            &mut out,
        );
        // Reference: rotate and round the same way, then exact attention.
        let mut qr = q.clone();
        for (i, row) in qr.chunks_exact_mut(qw).enumerate() {
            for hd in row.chunks_exact_mut(8) {
                rope.apply(hd, pos + i);
            }
        }
        round_f16(&mut qr);
        let mut kr = k.clone();
        for (i, row) in kr.chunks_exact_mut(kw).enumerate() {
            for hd in row.chunks_exact_mut(8) {
                rope.apply(hd, pos + i);
            }
        }
        round_f16(&mut kr);
        let mut vr = v.clone();
        round_f16(&mut vr);
        all_k.extend(kr);
        all_v.extend(vr);
        for i in 0..n {
            for head in 0..4 {
                let g = head / 2;
                let qh = &qr[i * qw + head * 8..][..8];
                let visible = pos + i + 1;
                let s: Vec<f64> = (0..visible)
                    .map(|j| {
                        let kj = &all_k[j * kw + g * 8..][..8];
                        qh.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / 8f64.sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..8 {
                    let want: f64 = (0..visible)
                        .map(|j| e[j] / z * all_v[j * kw + g * 8 + c] as f64)
                        .sum();
                    let got = out[i * qw + head * 8 + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "row {i} head {head}: {got} vs {want}"
                    );
                }
            }
        }
        pos += n;
    }
}

/// A sliding-window cache that drops what no row can see computes the same bits as one
/// that keeps everything, holds at most two windows plus a step, and a window of one sees
/// only the row itself.
#[test]
fn sliding_windows_drop_only_what_no_row_sees() {
    let h = Heads {
        n_head: 2,
        n_kv_head: 1,
        head_dim: 4,
    };
    let positions = 64;
    let rope = rope_table(positions * 2, 0.3);
    let val = |i: usize| ((i * 53 % 97) as f32 / 40.0) - 1.2;
    for w in [1, 3, 5] {
        let span = Span {
            scale: 0.5,
            window: Some(w),
        };
        let mut kept = LayerKv::with_capacity(8, 4, None);
        let mut dropping = LayerKv::with_capacity(8, 4, Some(w));
        let mut pos = 0;
        for n in [1, 1, 4, 1, 1, 1, 7, 1, 1, 2, 1, 1, 1, 1, 1] {
            let q: Vec<f32> = (0..n * 8).map(|i| val(i + 13 * pos)).collect();
            let k: Vec<f32> = (0..n * 4).map(|i| val(i * 7 + 3 * pos)).collect();
            let v: Vec<f32> = (0..n * 4).map(|i| val(i * 11 + 5 * pos + 1)).collect();
            let (mut a, mut b) = (vec![0f32; n * 8], vec![0f32; n * 8]);
            attend(h, span, &rope, &q, &k, &v, n, pos, &mut kept, &mut a);
            attend(h, span, &rope, &q, &k, &v, n, pos, &mut dropping, &mut b);
            assert_eq!(a, b, "window {w}, step at {pos}");
            assert!(dropping.held(4) <= 2 * w + n, "window {w}: holds too much");
            if w == 1 {
                // Each row sees only itself: its output is its own (rounded) value.
                for i in 0..n {
                    let vi: Vec<f32> = v[i * 4..i * 4 + 4]
                        .iter()
                        .map(|&x| f16::from_f32(x).to_f32())
                        .collect();
                    assert_eq!(a[i * 8..i * 8 + 4], vi[..]);
                    assert_eq!(a[i * 8 + 4..i * 8 + 8], vi[..]);
                }
            }
            pos += n;
        }
    }
}
