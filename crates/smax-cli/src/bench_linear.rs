//! `smax bench loss --op linear_cross_entropy`: the fused linear cross-entropy against the
//! materialized path (see `bench_loss`), time and peak extra memory for each, and how far the
//! two results are apart.

#![allow(clippy::too_many_arguments)]

use crate::alloc::peak_extra;
use crate::measure::{Record, fill_logits};
use smax::loss::{
    CrossEntropyOptions, LinearCrossEntropyOptions, LinearGrads, LinearInputs, LinearShape, RowOutputs, Targets,
    cross_entropy, linear_cross_entropy,
};
use smax::{View, ViewMut};
use std::io::Write;
use std::time::Instant;

/// `c (m x n, row-major) = a (m x k, strides ars/acs) · b (k x n, strides brs/bcs)`.
fn mm(
    c: &mut [f32],
    a: &[f32],
    ars: usize,
    acs: usize,
    b: &[f32],
    brs: usize,
    bcs: usize,
    m: usize,
    k: usize,
    n: usize,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && k > 0 && n > 0);
    assert!(last(m, k, ars, acs) < a.len() && last(k, n, brs, bcs) < b.len() && m * n <= c.len());
    let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
    // SAFETY: the asserts above keep every element the shapes and strides address inside its
    // slice; `c` is a unique borrow, `a` and `b` are only read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            acs as isize,
            ars as isize,
            b.as_ptr(),
            bcs as isize,
            brs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// The materialized path: logits, smax's fused cross-entropy into a gradient buffer, then the
/// two gradient products. Returns the loss.
pub(crate) fn materialized(
    h: &[f32],
    w: &[f32],
    y: &[i64],
    n: usize,
    d: usize,
    v: usize,
    dh: &mut [f32],
    dw: &mut [f32],
) -> f64 {
    let mut z = vec![0.0f32; n * v];
    mm(&mut z, h, d, 1, w, 1, d, n, d, v);
    let mut g = vec![0.0f32; n * v];
    let r = cross_entropy(
        View::rows(&z, n, v).expect("view"),
        Targets::Classes(y),
        Some(ViewMut::rows(&mut g, n, v).expect("view")),
        RowOutputs::default(),
        &CrossEntropyOptions::default(),
    )
    .expect("cross_entropy");
    drop(z);
    mm(dh, &g, v, 1, w, d, 1, n, v, d);
    mm(dw, &g, 1, v, h, d, 1, v, n, d);
    r.loss
}

pub(crate) fn fused(
    h: &[f32],
    w: &[f32],
    y: &[i64],
    n: usize,
    d: usize,
    v: usize,
    dh: &mut [f32],
    dw: &mut [f32],
) -> f64 {
    linear_cross_entropy(
        LinearShape { n, d, v },
        LinearInputs { h, w, bias: None, targets: y },
        LinearGrads { dh: Some(dh), dw: Some(dw), dbias: None },
        RowOutputs::default(),
        None,
        &LinearCrossEntropyOptions::default(),
    )
    .expect("linear_cross_entropy")
    .loss
}

pub(crate) fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)).max(f64::MIN_POSITIVE);
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max) / scale
}

pub fn bench_lce(n: usize, d: usize, v: usize, threads: usize, records: &mut Vec<Record>) -> Result<(), String> {
    let mut h = vec![0.0f32; n * d];
    let mut w = vec![0.0f32; v * d];
    fill_logits(&mut h, 5);
    fill_logits(&mut w, 6);
    let sh = 0.25 / (d as f32).sqrt();
    h.iter_mut().for_each(|x| *x *= sh);
    w.iter_mut().for_each(|x| *x *= 0.25);
    let y: Vec<i64> = (0..n).map(|i| ((i as u64 * 2_654_435_761) % v as u64) as i64).collect();
    let (mut dh, mut dw) = (vec![0.0f32; n * d], vec![0.0f32; v * d]);
    let (mut dh2, mut dw2) = (vec![0.0f32; n * d], vec![0.0f32; v * d]);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(|e| e.to_string())?;
    let flops = 6.0 * n as f64 * d as f64 * v as f64;
    let bytes = ((2 * n * d + 2 * v * d) * 4) as f64;
    let mut results = Vec::new();
    for imp in ["smax", "materialized"] {
        eprint!("\r\x1b[2Klinear_cross_entropy n={n} d={d} v={v} threads={threads} {imp} ...");
        let _ = std::io::stderr().flush();
        // Best of two (each run takes seconds); the peak is the second run's.
        let mut best = f64::INFINITY;
        let mut peak = 0;
        let mut loss = 0.0;
        for _ in 0..2 {
            let t0 = Instant::now();
            let (l, p) = pool.install(|| {
                peak_extra(|| {
                    if imp == "smax" {
                        fused(&h, &w, &y, n, d, v, &mut dh, &mut dw)
                    } else {
                        materialized(&h, &w, &y, n, d, v, &mut dh2, &mut dw2)
                    }
                })
            });
            best = best.min(t0.elapsed().as_secs_f64());
            peak = p;
            loss = l;
        }
        results.push((imp, best, peak, loss));
    }
    let loss_rel = (results[0].3 - results[1].3).abs() / results[1].3.abs();
    let grad_rel = max_rel(&dh, &dh2).max(max_rel(&dw, &dw2));
    for (imp, secs, peak, _) in results {
        records.push(Record {
            dtype: "f32",
            op: "linear_cross_entropy".into(),
            rows: n,
            cols: v,
            threads,
            imp: imp.into(),
            median_s: secs,
            gb_per_s: bytes / secs / 1e9,
            extra: vec![
                ("n", n.to_string()),
                ("d", d.to_string()),
                ("v", v.to_string()),
                ("peak_extra_bytes", peak.to_string()),
                ("gflops", format!("{:.2}", flops / secs / 1e9)),
                ("loss_rel_diff", format!("{loss_rel:e}")),
                ("grad_rel_diff", format!("{grad_rel:e}")),
            ],
        });
    }
    Ok(())
}
