//! `smax bench loss`: the losses side by side in one run.
//!
//! `cross_entropy` (rows = tokens, cols = classes; mean over integer targets): `smax` is the
//! fused forward+backward (logits read once, gradient written once: 2·4 bytes per logit,
//! compared with `copy`); `smax-fwd` the loss alone (4 bytes per logit, compared with `read`);
//! `naive` the composition log_softmax → gather → softmax − one-hot in plain loops; `candle`
//! candle-nn's `loss::cross_entropy` and its autograd backward.
//!
//! `linear_cross_entropy` (rows = N tokens, cols = V classes, hidden size d): `smax` is
//! [`smax::loss::linear_cross_entropy`] with the loss and all three gradients; `materialized`
//! forms the `N x V` logits with the same gemm crate, runs smax's fused cross-entropy in place
//! and takes the two gradient products. Records add `n`, `d`, `v`, `gflops` (2·N·d·V per
//! product: one forward, three forward+backward) and `peak_extra_bytes` (the largest amount
//! the call allocated beyond its inputs and outputs, from the counting allocator).

use crate::measure::{
    Args, Record, fill_logits, par_copy, par_read, parse_shape, pick_ops, print_table, time, timing, write_json,
};
use crate::peers;
use rayon::prelude::*;
use smax::loss::{CrossEntropyOptions, RowOutputs, Targets, cross_entropy};
use smax::{Par, View, ViewMut};
use std::io::Write;

const OPS: [&str; 2] = ["cross_entropy", "linear_cross_entropy"];
/// 256 MiB of f32 logits each, vocabularies from 8 Ki to 256 Ki.
const CE_SHAPES: [(usize, usize); 4] = [(8192, 8192), (2048, 32768), (512, 131072), (256, 262144)];
const CE_QUICK: [(usize, usize); 2] = [(512, 4096), (2048, 32768)];
/// (N, d, V) of the issue.
const LCE: [(usize, usize, usize); 2] = [(4096, 1024, 32768), (2048, 2048, 131072)];
const LCE_QUICK: [(usize, usize, usize); 1] = [(512, 256, 8192)];

fn targets(rows: usize, cols: usize) -> Vec<i64> {
    (0..rows).map(|r| ((r as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) as i64 % cols as i64).collect()
}

/// log_softmax into a materialized buffer, gather the loss, then grad = softmax − one-hot.
fn naive_ce(x: &[f32], lp: &mut [f32], g: &mut [f32], y: &[i64], cols: usize) -> f32 {
    let n = y.len() as f32;
    x.par_chunks(cols).zip(lp.par_chunks_mut(cols)).for_each(|(a, b)| {
        let m = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let s: f32 = a.iter().map(|&v| (v - m).exp()).sum();
        let ls = s.ln();
        for (o, &v) in b.iter_mut().zip(a) {
            *o = v - m - ls;
        }
    });
    let loss: f32 = lp.par_chunks(cols).zip(y.par_iter()).map(|(b, &t)| -b[t as usize]).sum();
    lp.par_chunks(cols).zip(g.par_chunks_mut(cols)).zip(y.par_iter()).for_each(|((b, o), &t)| {
        for (o, &v) in o.iter_mut().zip(b) {
            *o = v.exp() / n;
        }
        o[t as usize] -= 1.0 / n;
    });
    loss / n
}

pub fn run(a: Args) -> Result<(), String> {
    let (budget, max_iters) = timing(&a);
    let ops = pick_ops(&a.op, &OPS, "loss")?;
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads: Vec<usize> = if a.threads.is_empty() { vec![ncpu] } else { a.threads.clone() };
    let mut records: Vec<Record> = Vec::new();
    eprintln!(
        "smax bench loss: simd {}, threads {:?}, {:.2}s per record",
        smax::SimdLevel::default_level().name(),
        threads,
        budget
    );
    if ops.iter().any(|o| o == "cross_entropy") {
        let shapes: Vec<(usize, usize)> = if a.shape.is_empty() {
            if a.quick { CE_QUICK.to_vec() } else { CE_SHAPES.to_vec() }
        } else {
            a.shape.iter().map(|s| parse_shape(s)).collect::<Result<_, _>>()?
        };
        for &(rows, cols) in &shapes {
            bench_ce(rows, cols, &threads, budget, max_iters, &mut records)?;
        }
    }
    if ops.iter().any(|o| o == "linear_cross_entropy") {
        let shapes: Vec<(usize, usize, usize)> = if a.quick { LCE_QUICK.to_vec() } else { LCE.to_vec() };
        for &(n, d, v) in &shapes {
            for &t in &threads {
                crate::bench_linear::bench_lce(n, d, v, t, &mut records)?;
            }
        }
    }
    eprintln!("\r\x1b[2Kdone: {} records", records.len());
    print_table(&records);
    if let Some(path) = a.json {
        write_json(&path, &records).map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

fn bench_ce(
    rows: usize,
    cols: usize,
    threads: &[usize],
    budget: f64,
    max_iters: usize,
    records: &mut Vec<Record>,
) -> Result<(), String> {
    let n = rows.checked_mul(cols).ok_or("shape too large")?;
    let mut x = vec![0.0f32; n];
    fill_logits(&mut x, 3);
    let y = targets(rows, cols);
    let mut g = vec![0.0f32; n];
    let mut lp = vec![0.0f32; n];
    for &t in threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().map_err(|e| e.to_string())?;
        pool.install(|| -> Result<(), String> {
            eprint!("\r\x1b[2Kcross_entropy {rows}x{cols} threads={t} ...");
            let _ = std::io::stderr().flush();
            let par = if t == 1 { Par::Seq } else { Par::Rayon };
            let mut push = |imp: &str, secs: f64, bytes: f64| {
                records.push(Record {
                    dtype: "f32",
                    op: "cross_entropy".into(),
                    rows,
                    cols,
                    threads: t,
                    imp: imp.into(),
                    median_s: secs,
                    gb_per_s: bytes / secs / 1e9,
                    extra: Vec::new(),
                })
            };
            let (b1, b2) = ((n * 4) as f64, (2 * n * 4) as f64);
            push("copy", time(|| par_copy(&x, &mut g), budget, max_iters), b2);
            push(
                "read",
                time(
                    || {
                        std::hint::black_box(par_read(&x));
                    },
                    budget,
                    max_iters,
                ),
                b1,
            );
            let o = CrossEntropyOptions::default().par(par);
            // The fused call with the gradient (`smax`) and without it (`smax-fwd`).
            let mut ce = |grad: bool| {
                let g = grad.then(|| ViewMut::rows(&mut g, rows, cols).expect("view"));
                let r = cross_entropy(
                    View::rows(&x, rows, cols).expect("view"),
                    Targets::Classes(&y),
                    g,
                    RowOutputs::default(),
                    &o,
                )
                .expect("smax");
                std::hint::black_box(r);
            };
            push("smax", time(|| ce(true), budget, max_iters), b2);
            let secs = time(|| ce(false), budget, max_iters);
            push("smax-fwd", secs, b1);
            push(
                "naive",
                time(
                    || {
                        std::hint::black_box(naive_ce(&x, &mut lp, &mut g, &y, cols));
                    },
                    budget,
                    max_iters,
                ),
                b2,
            );
            if let Some(mut p) = peers::candle_ce(&x, rows, cols, &y) {
                push("candle", time(|| p.run(), budget, max_iters.min(5)), b2);
            }
            Ok(())
        })?;
    }
    Ok(())
}
