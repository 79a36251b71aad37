//! smax-candle's ops against candle's own, forward and forward+backward, at the core's 256 MiB
//! shapes and at attention's, plus the adapter's overhead over calling smax directly. Prints a
//! table and writes JSON records (`op`, `dtype`, `rows`, `cols`, `threads`, `impl`, `median_s`,
//! `gb_per_s`, as `smax bench --json`) with `--json PATH`.
//!
//! ```text
//! cargo run --release -p smax-candle --example candle_bench -- [--quick] [--json out.json]
//! ```
//!
//! `impl`: `candle` (candle's fastest op with the same result: `softmax_last_dim` for the
//! forward, the `ops::softmax` composition where a backward is needed, since
//! `softmax_last_dim` has none), `smax-candle` (this crate), `smax` (the library called on a
//! `Vec`, output allocated per call: the overhead baseline, timed alternately with the
//! adapter), and `roof` (`copy`: a fresh output filled by a parallel copy of the input; `read`:
//! a parallel sum of it). `x roof` is an op's GB/s over its roofline's: `read` for logsumexp
//! and the cross-entropy forward, `copy` for the rest of the memory-bound ops. Bytes: input
//! read + output written (forward), plus the gradient written (forward+backward).

use std::time::Instant;

use candle_core::{D, Device, Result, Tensor, Var};
use smax::attention::AttentionOptions;
use smax::loss::{CrossEntropyOptions, LinearCrossEntropyOptions};

struct Rec {
    op: &'static str,
    rows: usize,
    cols: usize,
    imp: &'static str,
    median_s: f64,
    bytes: f64,
}

fn time(mut f: impl FnMut() -> Result<()>, budget: f64) -> Result<f64> {
    f()?;
    let mut ts = Vec::new();
    let start = Instant::now();
    while ts.len() < 3 || (start.elapsed().as_secs_f64() < budget && ts.len() < 30) {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

fn logits(rows: usize, cols: usize) -> Result<Tensor> {
    Tensor::randn(0f32, 4.0, (rows, cols), &Device::Cpu)
}

/// Medians of `f` and `g` timed alternately (f, g, f, g, ...), so that a slow stretch of the
/// machine falls on both: the adapter's overhead over the library is their ratio.
fn pair(mut f: impl FnMut() -> Result<()>, mut g: impl FnMut() -> Result<()>, budget: f64) -> Result<(f64, f64)> {
    f()?;
    g()?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while a.len() < 5 || (start.elapsed().as_secs_f64() < 2.0 * budget && a.len() < 30) {
        let t = Instant::now();
        f()?;
        a.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        g()?;
        b.push(t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((med(&mut a), med(&mut b)))
}

/// A fresh output filled by a parallel copy of `x`: what any op returning a new tensor pays at
/// least (page faults, the kernel's zeroing, the write), the `copy` roofline.
fn fresh_copy(x: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(1 << 16).zip(x.par_chunks(1 << 16)).for_each(|(a, b)| a.copy_from_slice(b));
    y
}

/// A parallel sum of `x` in 16 lanes: the `read` roofline.
fn par_read(x: &[f32]) -> f32 {
    use rayon::prelude::*;
    x.par_chunks(1 << 16)
        .map(|c| {
            let mut acc = [0.0f32; 16];
            for v in c.chunks_exact(16) {
                for (a, b) in acc.iter_mut().zip(v) {
                    *a += *b;
                }
            }
            acc.iter().sum::<f32>() + c.chunks_exact(16).remainder().iter().sum::<f32>()
        })
        .sum()
}

/// The roofline an op's GB/s is compared with: `read` for the reductions, `copy` for the ops
/// that write a tensor as large as their input; none for the compute-bound ones.
fn roof_of(op: &str) -> Option<&'static str> {
    match op {
        "logsumexp" | "cross_entropy" => Some("read"),
        "softmax" | "log_softmax" | "softmax_fwd_bwd" | "log_softmax_fwd_bwd" | "cross_entropy_fwd_bwd" => Some("copy"),
        _ => None,
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let budget = if quick { 0.3 } else { 1.5 };
    let (rows, cols) = if quick { (256, 32768) } else { (2048, 32768) };
    let threads = rayon::current_num_threads();
    let mut recs = Vec::new();
    let mut push = |op, rows, cols, imp, median_s, bytes| recs.push(Rec { op, rows, cols, imp, median_s, bytes });
    let n = (rows * cols) as f64;

    // The normalisers, forward.
    let x = logits(rows, cols)?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    push(
        "copy",
        rows,
        cols,
        "roof",
        time(
            || {
                drop(std::hint::black_box(fresh_copy(&xs)));
                Ok(())
            },
            budget,
        )?,
        8.0 * n,
    );
    push(
        "read",
        rows,
        cols,
        "roof",
        time(
            || {
                std::hint::black_box(par_read(&xs));
                Ok(())
            },
            budget,
        )?,
        4.0 * n,
    );
    let lay = smax::Layout::rows(rows, cols);
    let o = smax::Options::default();
    let view = || smax::View::new(&xs, lay).map_err(candle_core::Error::wrap);
    let fwd = 8.0 * n;
    push("softmax", rows, cols, "candle", time(|| candle_nn::ops::softmax_last_dim(&x).map(drop), budget)?, fwd);
    let (a, b) = pair(
        || smax_candle::softmax(&x, D::Minus1).map(drop),
        || smax::softmax_to_vec(view()?, &o).map(drop).map_err(candle_core::Error::wrap),
        budget,
    )?;
    push("softmax", rows, cols, "smax-candle", a, fwd);
    push("softmax", rows, cols, "smax", b, fwd);

    push(
        "log_softmax",
        rows,
        cols,
        "candle",
        time(|| candle_nn::ops::log_softmax(&x, D::Minus1).map(drop), budget)?,
        fwd,
    );
    let (a, b) = pair(
        || smax_candle::log_softmax(&x, D::Minus1).map(drop),
        || smax::log_softmax_to_vec(view()?, &o).map(drop).map_err(candle_core::Error::wrap),
        budget,
    )?;
    push("log_softmax", rows, cols, "smax-candle", a, fwd);
    push("log_softmax", rows, cols, "smax", b, fwd);

    push("logsumexp", rows, cols, "candle", time(|| x.log_sum_exp(D::Minus1).map(drop), budget)?, 4.0 * n);
    let (a, b) = pair(
        || smax_candle::logsumexp(&x, D::Minus1).map(drop),
        || smax::logsumexp_to_vec(view()?, &o).map(drop).map_err(candle_core::Error::wrap),
        budget,
    )?;
    push("logsumexp", rows, cols, "smax-candle", a, 4.0 * n);
    push("logsumexp", rows, cols, "smax", b, 4.0 * n);

    // Forward+backward through Var (the gradient of Σ y; candle needs its composition here).
    let v = Var::from_tensor(&x)?;
    let fb = 16.0 * n;
    push(
        "softmax_fwd_bwd",
        rows,
        cols,
        "candle",
        time(|| candle_nn::ops::softmax(&v, D::Minus1)?.sum_all()?.backward().map(drop), budget)?,
        fb,
    );
    push(
        "softmax_fwd_bwd",
        rows,
        cols,
        "smax-candle",
        time(|| smax_candle::softmax(&v, D::Minus1)?.sum_all()?.backward().map(drop), budget)?,
        fb,
    );
    push(
        "log_softmax_fwd_bwd",
        rows,
        cols,
        "candle",
        time(|| candle_nn::ops::log_softmax(&v, D::Minus1)?.sum_all()?.backward().map(drop), budget)?,
        fb,
    );
    push(
        "log_softmax_fwd_bwd",
        rows,
        cols,
        "smax-candle",
        time(|| smax_candle::log_softmax(&v, D::Minus1)?.sum_all()?.backward().map(drop), budget)?,
        fb,
    );
    drop(v);

    // Cross-entropy: forward, and forward+backward.
    let (cr, cc) = if quick { (512, 16384) } else { (4096, 16384) };
    let (x, cn) = (logits(cr, cc)?, (cr * cc) as f64);
    let cs = x.flatten_all()?.to_vec1::<f32>()?;
    push(
        "copy",
        cr,
        cc,
        "roof",
        time(
            || {
                drop(std::hint::black_box(fresh_copy(&cs)));
                Ok(())
            },
            budget,
        )?,
        8.0 * cn,
    );
    push(
        "read",
        cr,
        cc,
        "roof",
        time(
            || {
                std::hint::black_box(par_read(&cs));
                Ok(())
            },
            budget,
        )?,
        4.0 * cn,
    );
    drop(cs);
    let t = Tensor::from_vec((0..cr as u32).map(|i| (i * 7919) % cc as u32).collect::<Vec<_>>(), cr, &Device::Cpu)?;
    let ce = CrossEntropyOptions::default();
    push(
        "cross_entropy",
        cr,
        cc,
        "candle",
        time(|| candle_nn::loss::cross_entropy(&x, &t).map(drop), budget)?,
        4.0 * cn,
    );
    push(
        "cross_entropy",
        cr,
        cc,
        "smax-candle",
        time(|| smax_candle::cross_entropy(&x, &t, &ce).map(drop), budget)?,
        4.0 * cn,
    );
    let v = Var::from_tensor(&x)?;
    push(
        "cross_entropy_fwd_bwd",
        cr,
        cc,
        "candle",
        time(|| candle_nn::loss::cross_entropy(&v, &t)?.backward().map(drop), budget)?,
        8.0 * cn,
    );
    push(
        "cross_entropy_fwd_bwd",
        cr,
        cc,
        "smax-candle",
        time(|| smax_candle::cross_entropy(&v, &t, &ce)?.backward().map(drop), budget)?,
        8.0 * cn,
    );
    drop((v, x));

    // Linear cross-entropy against the materialised logits.
    let (ln, ld, lv) = if quick { (256, 256, 8192) } else { (1024, 512, 16384) };
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (ln, ld), &Device::Cpu)?)?;
    let w = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (lv, ld), &Device::Cpu)? * 0.05)?)?;
    let lt = Tensor::from_vec((0..ln as u32).map(|i| (i * 7919) % lv as u32).collect::<Vec<_>>(), ln, &Device::Cpu)?;
    let lo = LinearCrossEntropyOptions::default();
    let lb = 4.0 * (ln * ld + lv * ld) as f64 * 2.0;
    push(
        "linear_ce_fwd_bwd",
        ln,
        lv,
        "candle",
        time(|| candle_nn::loss::cross_entropy(&h.matmul(&w.t()?)?, &lt)?.backward().map(drop), budget)?,
        lb,
    );
    push(
        "linear_ce_fwd_bwd",
        ln,
        lv,
        "smax-candle",
        time(|| smax_candle::linear_cross_entropy(&h, &w, &lt, &lo)?.backward().map(drop), budget)?,
        lb,
    );
    drop((h, w));

    // Attention, causal 1x8xSx64: candle has no CPU flash attention with a backward, so the
    // reference is the composition (scores materialised).
    let s = if quick { 512 } else { 2048 };
    let qkv = |seed: f32| Tensor::randn(seed * 0.0, 1.0f32, (1, 8, s, 64), &Device::Cpu);
    let (q, k, vv) = (qkv(1.0)?, qkv(2.0)?, qkv(3.0)?);
    let ao = AttentionOptions::default().causal(true);
    let ab = 4.0 * (4 * 8 * s * 64) as f64;
    push(
        "attention",
        8 * s,
        64,
        "candle",
        time(|| smax_candle::attention_composed(&q, &k, &vv, &ao).map(drop), budget)?,
        ab,
    );
    push(
        "attention",
        8 * s,
        64,
        "smax-candle",
        time(|| smax_candle::flash_attn(&q, &k, &vv, &ao).map(drop), budget)?,
        ab,
    );
    let (qv, kv, vvv) = (Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&vv)?);
    push(
        "attention_fwd_bwd",
        8 * s,
        64,
        "candle",
        time(|| smax_candle::attention_composed(&qv, &kv, &vvv, &ao)?.sum_all()?.backward().map(drop), budget)?,
        2.0 * ab,
    );
    push(
        "attention_fwd_bwd",
        8 * s,
        64,
        "smax-candle",
        time(|| smax_candle::flash_attn(&qv, &kv, &vvv, &ao)?.sum_all()?.backward().map(drop), budget)?,
        2.0 * ab,
    );

    println!(
        "{:<22} {:>12} {:>3} {:<12} {:>10} {:>7} {:>7} {:>9} {:>9}",
        "op", "shape", "thr", "impl", "median ms", "GB/s", "x roof", "x candle", "overhead"
    );
    for r in &recs {
        let base = recs.iter().find(|c| c.op == r.op && c.imp == "candle").map(|c| c.median_s / r.median_s);
        let roof = roof_of(r.op)
            .and_then(|k| recs.iter().find(|c| c.op == k && c.rows == r.rows && c.cols == r.cols))
            .filter(|_| r.imp != "roof")
            .map(|c| (r.bytes / r.median_s) / (c.bytes / c.median_s));
        let smax = recs.iter().find(|c| c.op == r.op && c.imp == "smax").filter(|_| r.imp == "smax-candle");
        println!(
            "{:<22} {:>12} {:>3} {:<12} {:>10.2} {:>7.2} {:>7} {:>9} {:>9}",
            r.op,
            format!("{}x{}", r.rows, r.cols),
            threads,
            r.imp,
            r.median_s * 1e3,
            r.bytes / r.median_s / 1e9,
            roof.map(|v| format!("{v:.2}")).unwrap_or_default(),
            base.map(|b| format!("{b:.2}")).unwrap_or_default(),
            smax.map(|c| format!("{:+.1}%", (r.median_s / c.median_s - 1.0) * 100.0)).unwrap_or_default(),
        );
    }
    if let Some(path) = json {
        let body: Vec<String> = recs
            .iter()
            .map(|r| {
                format!(
                    "  {{\"op\": \"{}\", \"dtype\": \"f32\", \"rows\": {}, \"cols\": {}, \"threads\": {threads}, \"impl\": \"{}\", \"median_s\": {:e}, \"gb_per_s\": {:.4}}}",
                    r.op, r.rows, r.cols, r.imp, r.median_s, r.bytes / r.median_s / 1e9
                )
            })
            .collect();
        std::fs::write(&path, format!("[\n{}\n]\n", body.join(",\n"))).map_err(candle_core::Error::wrap)?;
    }
    Ok(())
}
