//! smax-burn's operations against burn's own, forward and forward+backward (Autodiff), at the
//! core's 256 MiB shapes and at attention's, plus the adapter's overhead over calling smax
//! directly. Prints a table and writes JSON records (`op`, `dtype`, `rows`, `cols`, `threads`,
//! `impl`, `median_s`, `gb_per_s`, as `smax bench --json`) with `--json PATH`.
//!
//! ```text
//! cargo run --release -p smax-burn --example burn_bench -- [--quick] [--json out.json]
//! ```
//!
//! `impl`: `burn` (burn's `activation::softmax` / `log_softmax`, the max-shifted `logsumexp`
//! composition, `nn::loss::CrossEntropyLoss`, and the matmul/softmax attention composition),
//! `smax-burn` (this crate, on the Flex backend), `smax` (the library on a `Vec`, output
//! allocated per call: the overhead baseline, timed alternately with the adapter), and `roof`
//! (`copy`: a fresh output filled by a parallel copy of the input; `read`: a parallel sum of
//! it). `x roof` is an op's GB/s over its roofline's: `read` for logsumexp and the
//! cross-entropy forward, `copy` for the rest of the memory-bound ops.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Int, Tensor, activation};
use smax::attention::AttentionOptions;

struct Rec {
    op: &'static str,
    rows: usize,
    cols: usize,
    imp: &'static str,
    median_s: f64,
    bytes: f64,
}

fn time(mut f: impl FnMut(), budget: f64) -> f64 {
    f();
    let mut ts = Vec::new();
    let start = Instant::now();
    while ts.len() < 3 || (start.elapsed().as_secs_f64() < budget && ts.len() < 30) {
        let t = Instant::now();
        f();
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    ts[ts.len() / 2]
}

/// Forces the tensor's computation (burn may defer) by reading one element.
fn sync<const D: usize>(t: Tensor<D>) {
    let _ = t.flatten::<1>(0, D - 1).narrow(0, 0, 1).into_data();
}

/// Medians of `f` and `g` timed alternately (f, g, f, g, ...), so that a slow stretch of the
/// machine falls on both: the adapter's overhead over the library is their ratio.
fn pair(mut f: impl FnMut(), mut g: impl FnMut(), budget: f64) -> (f64, f64) {
    f();
    g();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while a.len() < 5 || (start.elapsed().as_secs_f64() < 2.0 * budget && a.len() < 30) {
        let t = Instant::now();
        f();
        a.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        g();
        b.push(t.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (med(&mut a), med(&mut b))
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

fn main() -> Result<(), smax::Error> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let budget = if quick { 0.3 } else { 1.5 };
    let (rows, cols) = if quick { (256, 32768) } else { (2048, 32768) };
    let threads = rayon::current_num_threads();
    let dev = Device::default();
    let mut recs = Vec::new();
    let mut push = |op, rows, cols, imp, median_s, bytes| recs.push(Rec { op, rows, cols, imp, median_s, bytes });
    let n = (rows * cols) as f64;

    let x = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 4.0), &dev);
    let xs: Vec<f32> = x.clone().into_data().try_to_vec::<f32>().unwrap_or_default();
    push("copy", rows, cols, "roof", time(|| drop(std::hint::black_box(fresh_copy(&xs))), budget), 8.0 * n);
    push(
        "read",
        rows,
        cols,
        "roof",
        time(
            || {
                std::hint::black_box(par_read(&xs));
            },
            budget,
        ),
        4.0 * n,
    );
    let lay = smax::Layout::rows(rows, cols);
    let o = smax::Options::default();
    let fwd = 8.0 * n;
    push("softmax", rows, cols, "burn", time(|| sync(activation::softmax(x.clone(), 1)), budget), fwd);
    let (a, b) = pair(
        || sync(smax_burn::softmax(x.clone(), 1).unwrap()),
        || drop(smax::softmax_to_vec(smax::View::new(&xs, lay).unwrap(), &o)),
        budget,
    );
    push("softmax", rows, cols, "smax-burn", a, fwd);
    push("softmax", rows, cols, "smax", b, fwd);

    push("log_softmax", rows, cols, "burn", time(|| sync(activation::log_softmax(x.clone(), 1)), budget), fwd);
    let (a, b) = pair(
        || sync(smax_burn::log_softmax(x.clone(), 1).unwrap()),
        || drop(smax::log_softmax_to_vec(smax::View::new(&xs, lay).unwrap(), &o)),
        budget,
    );
    push("log_softmax", rows, cols, "smax-burn", a, fwd);
    push("log_softmax", rows, cols, "smax", b, fwd);

    let lse = |x: Tensor<2>| {
        let m = x.clone().max_dim(1);
        (x - m.clone()).exp().sum_dim(1).log() + m
    };
    push("logsumexp", rows, cols, "burn", time(|| sync(lse(x.clone())), budget), 4.0 * n);
    let (a, b) = pair(
        || sync(smax_burn::logsumexp(x.clone(), 1).unwrap()),
        || drop(smax::logsumexp_to_vec(smax::View::new(&xs, lay).unwrap(), &o)),
        budget,
    );
    push("logsumexp", rows, cols, "smax-burn", a, 4.0 * n);
    push("logsumexp", rows, cols, "smax", b, 4.0 * n);

    drop(xs);

    // Forward+backward under Autodiff (the gradient of Σ y).
    let xa = x.clone().autodiff().require_grad();
    let fb = 16.0 * n;
    push(
        "softmax_fwd_bwd",
        rows,
        cols,
        "burn",
        time(|| drop(xa.grad(&activation::softmax(xa.clone(), 1).sum().backward())), budget),
        fb,
    );
    push(
        "softmax_fwd_bwd",
        rows,
        cols,
        "smax-burn",
        time(|| drop(xa.grad(&smax_burn::softmax(xa.clone(), 1).unwrap().sum().backward())), budget),
        fb,
    );
    push(
        "log_softmax_fwd_bwd",
        rows,
        cols,
        "burn",
        time(|| drop(xa.grad(&activation::log_softmax(xa.clone(), 1).sum().backward())), budget),
        fb,
    );
    push(
        "log_softmax_fwd_bwd",
        rows,
        cols,
        "smax-burn",
        time(|| drop(xa.grad(&smax_burn::log_softmax(xa.clone(), 1).unwrap().sum().backward())), budget),
        fb,
    );
    drop((x, xa));

    // Cross-entropy with padding: burn's loss against smax-burn's.
    let (cr, cc) = if quick { (512, 16384) } else { (4096, 16384) };
    let cn = (cr * cc) as f64;
    let x = Tensor::<2>::random([cr, cc], Distribution::Normal(0.0, 4.0), &dev);
    let cs: Vec<f32> = x.clone().into_data().try_to_vec::<f32>().unwrap_or_default();
    push("copy", cr, cc, "roof", time(|| drop(std::hint::black_box(fresh_copy(&cs))), budget), 8.0 * cn);
    push(
        "read",
        cr,
        cc,
        "roof",
        time(
            || {
                std::hint::black_box(par_read(&cs));
            },
            budget,
        ),
        4.0 * cn,
    );
    drop(cs);
    let tv: Vec<i64> = (0..cr as i64).map(|i| (i * 7919) % cc as i64).collect();
    let t = Tensor::<1, Int>::from_data(tv.as_slice(), &dev);
    let theirs = burn::nn::loss::CrossEntropyLossConfig::new().with_pad_tokens(Some(vec![0])).init(&dev);
    let ours = smax_burn::CrossEntropyLossConfig::new().with_pad_tokens(Some(vec![0])).init();
    push("cross_entropy", cr, cc, "burn", time(|| sync(theirs.forward(x.clone(), t.clone())), budget), 4.0 * cn);
    push(
        "cross_entropy",
        cr,
        cc,
        "smax-burn",
        time(|| sync(ours.forward(x.clone(), t.clone()).unwrap()), budget),
        4.0 * cn,
    );
    let xa = x.clone().autodiff().require_grad();
    let ta = t.clone();
    push(
        "cross_entropy_fwd_bwd",
        cr,
        cc,
        "burn",
        time(|| drop(xa.grad(&theirs.forward(xa.clone(), ta.clone()).backward())), budget),
        8.0 * cn,
    );
    push(
        "cross_entropy_fwd_bwd",
        cr,
        cc,
        "smax-burn",
        time(|| drop(xa.grad(&ours.forward(xa.clone(), ta.clone()).unwrap().backward())), budget),
        8.0 * cn,
    );
    drop((x, xa));

    // Attention, causal 1x8xSx64, against the composition.
    let s = if quick { 512 } else { 2048 };
    let qkv = || Tensor::<4>::random([1, 8, s, 64], Distribution::Normal(0.0, 1.0), &dev);
    let (q, k, v) = (qkv(), qkv(), qkv());
    let ao = AttentionOptions::default().causal(true);
    let ab = 4.0 * (4 * 8 * s * 64) as f64;
    push(
        "attention",
        8 * s,
        64,
        "burn",
        time(|| sync(smax_burn::composed::attention(q.clone(), k.clone(), v.clone(), &ao).unwrap()), budget),
        ab,
    );
    push(
        "attention",
        8 * s,
        64,
        "smax-burn",
        time(|| sync(smax_burn::attention(q.clone(), k.clone(), v.clone(), &ao).unwrap()), budget),
        ab,
    );
    let (qa, ka, va) = (q.autodiff().require_grad(), k.autodiff().require_grad(), v.autodiff().require_grad());
    push(
        "attention_fwd_bwd",
        8 * s,
        64,
        "burn",
        time(
            || {
                drop(qa.grad(
                    &smax_burn::composed::attention(qa.clone(), ka.clone(), va.clone(), &ao).unwrap().sum().backward(),
                ))
            },
            budget,
        ),
        2.0 * ab,
    );
    push(
        "attention_fwd_bwd",
        8 * s,
        64,
        "smax-burn",
        time(
            || drop(qa.grad(&smax_burn::attention(qa.clone(), ka.clone(), va.clone(), &ao).unwrap().sum().backward())),
            budget,
        ),
        2.0 * ab,
    );

    println!(
        "{:<22} {:>12} {:>3} {:<10} {:>10} {:>7} {:>7} {:>8} {:>9}",
        "op", "shape", "thr", "impl", "median ms", "GB/s", "x roof", "x burn", "overhead"
    );
    for r in &recs {
        let base = recs.iter().find(|c| c.op == r.op && c.imp == "burn").map(|c| c.median_s / r.median_s);
        let roof = roof_of(r.op)
            .and_then(|k| recs.iter().find(|c| c.op == k && c.rows == r.rows && c.cols == r.cols))
            .filter(|_| r.imp != "roof")
            .map(|c| (r.bytes / r.median_s) / (c.bytes / c.median_s));
        let smax = recs.iter().find(|c| c.op == r.op && c.imp == "smax").filter(|_| r.imp == "smax-burn");
        println!(
            "{:<22} {:>12} {:>3} {:<10} {:>10.2} {:>7.2} {:>7} {:>8} {:>9}",
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
        std::fs::write(&path, format!("[\n{}\n]\n", body.join(",\n"))).map_err(|e| smax::Error::Unsupported {
            what: "--json",
            why: if e.kind() == std::io::ErrorKind::NotFound { "directory not found" } else { "cannot write the file" },
        })?;
    }
    Ok(())
}
