//! Reproductions that measure smax's kernels directly (no training): two-pass softmax, clipped
//! softmax's exact zeros, LSSA/LSSAR against length, unified-max decoding, quantizers.

use smax::attention::{
    AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, ClippedSoftmax, Heads, Lssa, SplitK,
    UnifiedDecode, UnifiedMax, attention, attention_clipped, attention_decode, attention_decode_unified,
    attention_lssa, profile_unified_max,
};
use smax::quant::{Quantizer, SulqExponent, SulqLevels, ZeroMode, calibrate_log_sqrt2, calibrate_sulq, quantize};
use smax::{Algorithm, Exec, Options, Par, View, ViewMut};

use super::{Outcome, Preset, Rng, Table, median_time};

fn e(x: smax::Error) -> String {
    x.to_string()
}

/// Distance in units in the last place of f32 at `want`, for `want` in the normal range (the
/// subnormal outputs are measured by their absolute error instead).
fn ulps(got: f32, want: f64) -> f64 {
    let w = want as f32;
    let spacing = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
    (got as f64 - want).abs() / spacing
}

/// Claim 1 (Dukhan & Ablavatski): two-pass softmax against the three-pass (reload) variant and
/// the online normaliser, on rows far out of cache, inputs U[−1000, 1000] as XNNPACK's bench.
pub fn two_pass(p: Preset, seed: u64) -> Result<Outcome, String> {
    let (rows, len, reps) = match p {
        Preset::Tiny => (4, 1 << 14, 3),
        Preset::Quick => (64, 1 << 20, 5),
        Preset::Full => (128, 1 << 20, 9),
    };
    let mut rng = Rng(seed ^ 0x2a55);
    let x: Vec<f32> = (0..rows * len).map(|_| (rng.uniform() * 2000.0 - 1000.0) as f32).collect();
    let mut y = vec![0.0f32; x.len()];
    let bytes = 8.0 * x.len() as f64;
    // f64 reference of two rows, for the error.
    let reference: Vec<Vec<f64>> = (0..2)
        .map(|r| {
            let row = &x[r * len..(r + 1) * len];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            row.iter().map(|&v| (v as f64 - m).exp() / s).collect()
        })
        .collect();
    let mut t = Table::new(
        format!("softmax of {rows} rows x {len} f32 (input {} MiB), GB/s = (read + write) / time", (x.len() * 4) >> 20),
        &["threads", "algorithm", "GB/s", "vs three-pass", "max ulp (normal outputs)", "max abs err (below)"],
    );
    let mut gain = Vec::new();
    for (threads, par) in [(1usize, Par::Seq), (2, Par::Rayon)] {
        let mut base = f64::NAN;
        for (name, alg) in
            [("three-pass", Algorithm::ThreePass), ("two-pass", Algorithm::TwoPass), ("online", Algorithm::Online)]
        {
            let o = Options { algorithm: alg, exec: Exec { par, simd: None }, ..Default::default() };
            let mut run = || {
                smax::softmax(View::rows(&x, rows, len).unwrap(), ViewMut::rows(&mut y, rows, len).unwrap(), &o)
                    .unwrap()
            };
            run();
            let secs = median_time(reps, run);
            let pairs = || {
                reference
                    .iter()
                    .enumerate()
                    .flat_map(|(r, want)| y[r * len..(r + 1) * len].iter().copied().zip(want.iter().copied()))
            };
            let normal = f32::MIN_POSITIVE as f64;
            let err = pairs().filter(|&(_, w)| w >= normal).map(|(g, w)| ulps(g, w)).fold(0.0f64, f64::max);
            let tiny = pairs().filter(|&(_, w)| w < normal).map(|(g, w)| (g as f64 - w).abs()).fold(0.0f64, f64::max);
            let gbs = bytes / secs / 1e9;
            if alg == Algorithm::ThreePass {
                base = gbs;
            }
            if alg != Algorithm::ThreePass {
                gain.push((threads, name, gbs / base));
            }
            t.row(vec![threads.into(), name.into(), gbs.into(), (gbs / base).into(), err.into(), tiny.into()]);
        }
    }
    let verdict = gain
        .iter()
        .map(|(th, name, g)| format!("{name} {g:.2}x three-pass at {th} thread(s)"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Outcome {
        tables: vec![t],
        paper: "two-pass faster than three-pass by up to 28 % (AVX-512) and 18 % (AVX2) on Skylake-X, results within a few ulp".into(),
        verdict: format!(
            "{verdict} (this machine; `smax info` gives the SIMD level). smax's online pass, pipelined across rows, is a third contender the paper does not time; every algorithm stays within the same few ulp of f64"
        ),
    })
}

/// Weights of the keys for one query: the attention output with values `e_j` (one block of
/// `head_dim` keys at a time, the other values zero) is the weight vector of that block.
fn weights_by_probe(
    n: usize,
    d: usize,
    q: &[f32],
    k: &[f32],
    mut run: impl FnMut(&[f32], &[f32], &[f32], &mut [f32]) -> Result<(), String>,
) -> Result<Vec<f64>, String> {
    let mut w = vec![0.0f64; n];
    let mut v = vec![0.0f32; n * d];
    let mut out = vec![0.0f32; d];
    for b0 in (0..n).step_by(d) {
        v.fill(0.0);
        for j in b0..(b0 + d).min(n) {
            v[j * d + (j - b0)] = 1.0;
        }
        run(q, k, &v, &mut out)?;
        for j in b0..(b0 + d).min(n) {
            w[j] = out[j - b0] as f64;
        }
    }
    Ok(w)
}

/// Claim 7 (Gao & Spratling): attention entropy and largest weight against the number of keys
/// for softmax, LSSA and LSSAR (p = 3, 15), on random queries and keys; and LSSAR's power
/// computed in the log domain where the naive power overflows.
pub fn lssa_length(p: Preset, seed: u64) -> Result<Outcome, String> {
    let (lens, queries): (&[usize], usize) = match p {
        Preset::Tiny => (&[64, 256], 2),
        Preset::Quick => (&[256, 1024, 4096, 16384], 8),
        Preset::Full => (&[256, 1024, 4096, 16384, 65536], 16),
    };
    let d = 64;
    let mut rng = Rng(seed ^ 0x155a);
    let mut t = Table::new(
        format!("one query over N random keys (d = {d}, mean of {queries} queries): entropy / ln N and largest weight"),
        &["N", "method", "entropy/lnN", "max weight", "sum of weights"],
    );
    let mut finite = true;
    let mut ranges: Vec<(&str, f64, f64, f64, f64)> = Vec::new();
    for &n in lens {
        let methods: [(&str, Option<Lssa>); 4] = [
            ("softmax", None),
            ("LSSA", Some(Lssa { reweight: None, offset_rows: 3 })),
            ("LSSAR p=3", Some(Lssa { reweight: Some(3.0), offset_rows: 3 })),
            ("LSSAR p=15", Some(Lssa { reweight: Some(15.0), offset_rows: 3 })),
        ];
        let qs: Vec<Vec<f32>> = (0..queries).map(|_| (0..d).map(|_| rng.normal() as f32).collect()).collect();
        let k: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        for (name, lssa) in methods {
            let (mut h, mut mx, mut sum) = (0.0, 0.0, 0.0);
            for q in &qs {
                let shape = AttentionShape::new(1, 1, 1, n, d);
                let w = weights_by_probe(n, d, q, &k, |q, k, v, out| {
                    let inp = AttentionInputs::new(shape, Heads::new(q), Heads::new(k), Heads::new(v));
                    match lssa {
                        None => {
                            attention(inp, AttentionOutputs::new(out, None), &AttentionOptions::default()).map_err(e)
                        }
                        Some(l) => attention_lssa(inp, out, &AttentionOptions::default().with_variant(l))
                            .map(|_| ())
                            .map_err(e),
                    }
                })?;
                finite &= w.iter().all(|x| x.is_finite());
                h += -w.iter().filter(|&&x| x > 0.0).map(|&x| x * x.ln()).sum::<f64>() / (n as f64).ln();
                mx += w.iter().cloned().fold(0.0, f64::max);
                sum += w.iter().sum::<f64>();
            }
            let nq = queries as f64;
            let (h, mx) = (h / nq, mx / nq);
            match ranges.iter_mut().find(|r| r.0 == name) {
                Some(r) => *r = (name, r.1.min(h), r.2.max(h), r.3.min(mx), r.4.max(mx)),
                None => ranges.push((name, h, h, mx, mx)),
            }
            t.row(vec![n.into(), name.into(), h.into(), mx.into(), (sum / nq).into()]);
        }
    }
    // The naive power: (N·A − 1)^15 in f32 for a weight A of a few times the uniform 1/N.
    let mut s = Table::new(
        "LSSAR's power in f32 for a weight A = 1/2: naive (N*A - 1)^15 against smax's log domain",
        &["N", "naive in f32", "smax's LSSAR weights above"],
    );
    for n in [1024usize, 8192, 65536] {
        let a = (n as f32 / 2.0) / n as f32;
        let naive = (n as f32 * a - 1.0).powf(15.0);
        s.row(vec![
            n.into(),
            format!("{naive:e}").into(),
            if finite { "finite, sum 1".into() } else { "NON-FINITE".into() },
        ]);
    }
    Ok(Outcome {
        tables: vec![t, s],
        paper: "LSSA(R) keeps attention from flattening with length: GPT-2 124M trained at 1K, validation loss at 1K/2K/4K/8K: softmax 3.19/4.17/5.45/6.28, LSSAR (p = 15) 3.19/3.19/3.23/3.32 [secondary]; (N-1)^15 overflows f32 at N = 8192".into(),
        verdict: format!(
            "qualitative, over N = {}..{}: {}; smax's LSSAR stays finite where the naive power is inf. The language-model losses need a GPT-2 run, not attempted",
            lens[0],
            lens[lens.len() - 1],
            ranges
                .iter()
                .map(|r| format!("{} entropy/ln N {:.2}-{:.2}, max weight {:.4}-{:.4}", r.0, r.1, r.2, r.3, r.4))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    })
}

/// Claim 5(a) (Bondarenko et al.): the smallest logit gap at which clipped softmax gives an
/// exact zero, against `ln(ζ/−γ)`; softmax gives none short of f32's underflow.
pub fn clipped_softmax(_p: Preset, _seed: u64) -> Result<Outcome, String> {
    // Two keys, scores [0, −g] (scale 1): the second weight is exactly 0 from the gap on.
    let weight = |g: f32, c: Option<ClippedSoftmax>| -> Result<f32, String> {
        let (q, k, v) = ([1.0f32, 0.0], [0.0f32, 0.0, -g, 0.0], [1.0f32, 0.0, 0.0, 1.0]);
        let shape = AttentionShape::new(1, 1, 1, 2, 2);
        let inp = AttentionInputs::new(shape, Heads::new(&q), Heads::new(&k), Heads::new(&v));
        let mut out = [0.0f32; 2];
        let base = AttentionOptions::default().scale(1.0);
        match c {
            None => attention(inp, AttentionOutputs::new(&mut out, None), &base).map_err(e)?,
            Some(c) => {
                attention_clipped(inp, AttentionOutputs::new(&mut out, None), &base.with_variant(c)).map_err(e)?
            }
        }
        Ok(out[1])
    };
    // Bisection on the f32 grid: the smallest g in [0, 200] with weight exactly 0.
    let smallest = |c: Option<ClippedSoftmax>| -> Result<f64, String> {
        let (mut lo, mut hi) = (0.0f32, 200.0f32);
        if weight(hi, c)? != 0.0 {
            return Ok(f64::INFINITY);
        }
        while f32::from_bits(lo.to_bits() + 1) < hi {
            let mid = lo + (hi - lo) / 2.0;
            if mid <= lo || mid >= hi {
                break;
            }
            if weight(mid, c)? == 0.0 { hi = mid } else { lo = mid }
        }
        Ok(hi as f64)
    };
    let mut t = Table::new(
        "two keys, scores [0, -g]: the smallest gap g with an exactly-zero weight",
        &["setting", "zeta", "gamma", "analytic ln(zeta/-gamma)", "measured", "rel. diff"],
    );
    let mut worst = 0.0f64;
    for (name, c) in [
        ("BERT", ClippedSoftmax::bert()),
        ("OPT (alpha 12, T 512)", ClippedSoftmax { zeta: 1.0, gamma: -12.0 / 512.0 }),
        ("zeta 1.003, gamma -0.003", ClippedSoftmax { zeta: 1.003, gamma: -0.003 }),
    ] {
        let want = (c.zeta as f64 / -(c.gamma as f64)).ln();
        let got = smallest(Some(c))?;
        worst = worst.max((got - want).abs() / want);
        t.row(vec![
            name.into(),
            (c.zeta as f64).into(),
            (c.gamma as f64).into(),
            want.into(),
            got.into(),
            ((got - want) / want).into(),
        ]);
    }
    let soft = smallest(None)?;
    t.row(vec!["softmax".into(), 1.0.into(), 0.0.into(), f64::INFINITY.into(), soft.into(), f64::NAN.into()]);
    Ok(Outcome {
        tables: vec![t],
        paper: "exact zeros at a finite logit gap ln(zeta/-gamma) = 3.689 in the BERT setting, none for softmax; (b) BERT-base max inf-norm ~735 vs ~21.5 with clipped softmax [memory]".into(),
        verdict: format!(
            "(a) reproduced: measured gaps within {:.1e} relative of ln(zeta/-gamma) (f32 rounding of the weight), softmax needs a gap of {soft:.2} (f32 underflow); (b), the outlier study on a trained transformer, is not run here",
            worst
        ),
    })
}

/// Claim 8 (FlashDecoding++): the unified max's fallback rate for Gaussian scores under the
/// paper's rule with φ at the low end of the profiled 99.99 % range, and the speed of
/// unified-max decoding against split-K with synchronised rescaling.
pub fn unified_max(p: Preset, seed: u64) -> Result<Outcome, String> {
    let (heads, kv_heads, n, d, reps) = match p {
        Preset::Tiny => (4, 2, 2048, 64, 3),
        Preset::Quick => (32, 8, 16384, 128, 7),
        Preset::Full => (32, 8, 32768, 128, 11),
    };
    let mut rng = Rng(seed ^ 0xdec0);
    let q: Vec<f32> = (0..heads * d).map(|_| rng.normal() as f32).collect();
    let k: Vec<f32> = (0..kv_heads * n * d).map(|_| rng.normal() as f32).collect();
    let v: Vec<f32> = (0..kv_heads * n * d).map(|_| rng.normal() as f32).collect();
    let shape = AttentionShape::new(1, heads, 1, n, d).kv_heads(kv_heads);
    let scale = 1.0 / (d as f32).sqrt();
    // Calibration scores: the first query head against every key of its group.
    let calib: Vec<f32> = (0..n).map(|j| (0..d).map(|i| q[i] * k[j * d + i]).sum::<f32>() * scale).collect();
    let (lo, hi) = profile_unified_max(&calib, 0.9999).map_err(e)?;
    let inp = || AttentionInputs::new(shape, Heads::new(&q), Heads::new(&k), Heads::new(&v));
    let mut out = vec![0.0f32; shape.out_len()];
    let split = SplitK { split_len: 2048.min(n / 2).max(1) };
    let base = median_time(reps, || {
        attention_decode(inp(), AttentionOutputs::new(&mut out, None), &AttentionOptions::default().with_variant(split))
            .unwrap()
    });
    let mut t = Table::new(
        format!(
            "decode: {heads} query heads ({kv_heads} KV heads), {n} keys, d = {d}; scores ~ N(0, 1); profiled 99.99 % range [{lo:.3}, {hi:.3}], phi = {lo:.3}"
        ),
        &["method", "window on x - phi", "fallback rows", "time (ms)", "vs split-K"],
    );
    t.row(vec!["split-K (synchronised)".into(), "-".into(), 0usize.into(), (base * 1e3).into(), 1.0.into()]);
    let mut ratios = Vec::new();
    for (name, um) in [
        ("unified, the paper's window", UnifiedMax { a: -1e-3, b: Some(hi - lo + 1e-3), ..UnifiedMax::new(lo) }),
        ("unified, a = -60, b = ln(MAX) - ln N - 1", UnifiedMax::new(lo)),
    ] {
        let o = AttentionOptions::default().with_variant(UnifiedDecode { split, max: um });
        let mut st = Default::default();
        let secs = median_time(reps, || {
            st = attention_decode_unified(inp(), AttentionOutputs::new(&mut out, None), &o).unwrap()
        });
        let win = format!("({:.3}, {:.3})", um.a, um.b.unwrap_or(f32::MAX.ln() - (n as f32).ln() - 1.0));
        ratios.push((st.fallback_rows, st.rows, secs / base));
        t.row(vec![
            name.into(),
            win.into(),
            format!("{} of {}", st.fallback_rows, st.rows).into(),
            (secs * 1e3).into(),
            (secs / base).into(),
        ]);
    }
    let per_row = 1.0 - 0.9999f64.powi(n as i32);
    Ok(Outcome {
        tables: vec![t],
        paper: "synchronised partial-softmax update = 18.8 % of attention time (Llama2-7B, A100); unified max with phi from the 99.99 % profiled range, recomputing when any score leaves the window".into(),
        verdict: format!(
            "the paper's per-element rule over the 99.99 % range sends {} of {} rows to the fallback (expected 1 - 0.9999^{n} = {:.0} % per row) and takes {:.2}x the split-K time; the wide window (a = -60, b from overflow) falls back on {} rows and takes {:.2}x, i.e. the synchronised rescale costs {:.0} % of split-K decoding here (the paper: 18.8 % on an A100)",
            ratios[0].0,
            ratios[0].1,
            per_row * 100.0,
            ratios[0].2,
            ratios[1].0,
            ratios[1].2,
            (1.0 - ratios[1].2) * 100.0
        ),
    })
}

/// Claims 10/11 (RepQ-ViT, I&S-ViT): MSE of post-softmax attention quantized by uniform, log2,
/// log√2 and SULQ at 3, 4 and 6 bits, on attention from random queries and keys with a
/// power-law spectrum.
pub fn quantizers(p: Preset, seed: u64) -> Result<Outcome, String> {
    let (maps, n): (usize, usize) = match p {
        Preset::Tiny => (2, 64),
        Preset::Quick => (16, 197),
        Preset::Full => (64, 197),
    };
    let d = 64;
    let mut rng = Rng(seed ^ 0x9a47);
    let mut attn = |count: usize| -> Result<Vec<f32>, String> {
        let mut all = Vec::with_capacity(count * n * n);
        for _ in 0..count {
            // Power-law spectrum: dimension i scaled by (i + 1)^-0.5, then a temperature that
            // gives peaked rows as trained ViTs have.
            let s: Vec<f64> = (0..d).map(|i| 4.0 * ((i + 1) as f64).powf(-0.5)).collect();
            let q: Vec<f64> = (0..n * d).map(|j| rng.normal() * s[j % d]).collect();
            let k: Vec<f64> = (0..n * d).map(|j| rng.normal() * s[j % d]).collect();
            let mut z = vec![0.0f32; n * n];
            for i in 0..n {
                for j in 0..n {
                    z[i * n + j] =
                        ((0..d).map(|t| q[i * d + t] * k[j * d + t]).sum::<f64>() / (d as f64).sqrt()) as f32;
                }
            }
            all.extend(smax::softmax_to_vec(View::rows(&z, n, n).map_err(e)?, &Options::default()).map_err(e)?);
        }
        Ok(all)
    };
    let calib = attn(maps.div_ceil(2))?;
    let test = attn(maps)?;
    let mut t = Table::new(
        format!("MSE on {maps} attention maps of {n}x{n} (calibrated on {} others)", maps.div_ceil(2)),
        &["bits", "uniform", "log2", "log-sqrt2", "SULQ", "best"],
    );
    let mut codes = vec![0u16; test.len()];
    let mut zero = vec![false; test.len()];
    let mut sulq_vs_log2_3 = f64::NAN;
    let mut wins = Vec::new();
    for bits in [3u32, 4, 6] {
        let mx = calib.iter().cloned().fold(0.0f32, f32::max) as f64;
        let qs = [
            ("uniform", Quantizer::Uniform { bits, min: 0.0, max: mx }),
            ("log2", Quantizer::Log2 { bits, delta: 1.0, zero_mode: ZeroMode::Zero }),
            ("log-sqrt2", calibrate_log_sqrt2(&calib, bits).map_err(e)?),
            ("SULQ", calibrate_sulq(&calib, bits, SulqExponent::Rounded, SulqLevels::Bits).map_err(e)?),
        ];
        let mut mse = Vec::new();
        for (_, q) in &qs {
            mse.push(quantize(&test, q, &mut codes, Some(&mut zero), None).map_err(e)?.mse);
        }
        let best = (0..4).min_by(|&a, &b| mse[a].total_cmp(&mse[b])).unwrap_or(0);
        if bits == 3 {
            sulq_vs_log2_3 = mse[3] / mse[1];
        }
        wins.push(format!("{bits} bits: {}", qs[best].0));
        t.row(vec![
            (bits as usize).into(),
            mse[0].into(),
            mse[1].into(),
            mse[2].into(),
            mse[3].into(),
            qs[best].0.into(),
        ]);
    }
    Ok(Outcome {
        tables: vec![t],
        paper: "log-sqrt2 (RepQ-ViT) and SULQ (I&S-ViT) fit post-softmax maps better than uniform and log2 at low bits; I&S-ViT: SULQ has lower MSE than log2 at 3 bits (accuracy gains at W3/W4: ViT-B 3-bit +50.68 %)".into(),
        verdict: format!(
            "best per bit width: {}; SULQ / log2 MSE at 3 bits = {sulq_vs_log2_3:.3} ({} on this synthetic distribution); the ImageNet accuracies need trained ViTs and are not reproduced",
            wins.join(", "),
            if sulq_vs_log2_3 < 1.0 { "I&S-ViT's 3-bit claim reproduced" } else { "I&S-ViT's 3-bit claim NOT reproduced" }
        ),
    })
}
