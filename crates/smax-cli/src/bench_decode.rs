//! `smax bench decode`: sampling side by side (`op` = `top_k` (k = 50), `top_p` (p = 0.9) or
//! `min_p` (0.05); rows = batch, cols = vocabulary). `smax` is [`smax::sample::sample`];
//! `sort` the textbook path (softmax, full sort, cut, renormalise, draw) in plain loops, rows
//! in parallel; `candle` candle-transformers' `LogitsProcessor`, one row after another as a
//! decoding loop calls it (it has no min-p). `gate` (rows = tokens, cols = experts): smax's
//! softmax-then-top-k router against a per-token full sort. Bytes counted: the logits read once.

use crate::measure::{Args, Record, fill_logits, parse_shape, pick_ops, print_table, time, timing, write_json};
use crate::peers;
use rayon::prelude::*;
use smax::sample::{Draw, SampleOptions, sample};
use smax::{Par, View};
use std::io::Write;

const OPS: [&str; 4] = ["top_k", "top_p", "min_p", "gate"];
/// (tokens, experts, k) of the gating records.
const GATES: [(usize, usize, usize); 3] = [(4096, 8, 2), (4096, 64, 8), (4096, 256, 8)];
const SHAPES: [(usize, usize); 6] = [(1, 32000), (64, 32000), (1, 131072), (64, 131072), (1, 262144), (64, 262144)];
const QUICK: [(usize, usize); 2] = [(1, 131072), (64, 131072)];

fn params(op: &str) -> SampleOptions {
    match op {
        "top_k" => SampleOptions { top_k: Some(50), ..Default::default() },
        "top_p" => SampleOptions { top_p: Some(0.9), ..Default::default() },
        _ => SampleOptions { min_p: Some(0.05), ..Default::default() },
    }
}

/// The sort-based path for one row.
fn sort_row(x: &[f32], p: &SampleOptions, u: f64) -> u32 {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut pr: Vec<(f32, u32)> = x.iter().enumerate().map(|(i, &v)| ((v - m).exp(), i as u32)).collect();
    let s: f32 = pr.iter().map(|v| v.0).sum();
    pr.iter_mut().for_each(|v| v.0 /= s);
    pr.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
    let mut n = pr.len();
    if let Some(k) = p.top_k {
        n = n.min(k);
    }
    if let Some(pp) = p.top_p {
        let total: f32 = pr[..n].iter().map(|v| v.0).sum();
        let mut c = 0.0;
        for (j, v) in pr[..n].iter().enumerate() {
            if c >= pp as f32 * total {
                n = j.max(1);
                break;
            }
            c += v.0;
        }
    }
    if let Some(mp) = p.min_p {
        let th = pr[0].0 * mp as f32;
        n = pr[..n].iter().take_while(|v| v.0 >= th).count().max(1);
    }
    let total: f32 = pr[..n].iter().map(|v| v.0).sum();
    let target = u as f32 * total;
    let mut c = 0.0;
    for v in &pr[..n] {
        c += v.0;
        if c > target {
            return v.1;
        }
    }
    pr[n - 1].1
}

pub fn run(a: Args) -> Result<(), String> {
    let (budget, max_iters) = timing(&a);
    let ops = pick_ops(&a.op, &OPS, "decode")?;
    let shapes: Vec<(usize, usize)> = if a.shape.is_empty() {
        if a.quick { QUICK.to_vec() } else { SHAPES.to_vec() }
    } else {
        a.shape.iter().map(|s| parse_shape(s)).collect::<Result<_, _>>()?
    };
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = if a.threads.is_empty() { vec![ncpu] } else { a.threads.clone() };
    let mut records = Vec::new();
    eprintln!("smax bench decode: threads {threads:?}, {budget:.2}s per record");
    if ops.iter().any(|o| o == "gate") {
        for &(tokens, e, k) in &GATES {
            bench_gate(tokens, e, k, &threads, budget, max_iters, &mut records)?;
        }
    }
    let ops: Vec<String> = ops.into_iter().filter(|o| o != "gate").collect();
    for &(rows, cols) in &shapes {
        if ops.is_empty() {
            break;
        }
        let mut x = vec![0.0f32; rows * cols];
        fill_logits(&mut x, 11);
        let seeds: Vec<u64> = (0..rows as u64).collect();
        let us: Vec<f64> = seeds.iter().map(|&s| smax::sample::counter_uniform(s, 0)).collect();
        let mut toks = vec![0u32; rows];
        for &t in &threads {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().map_err(|e| e.to_string())?;
            pool.install(|| -> Result<(), String> {
                let par = if t == 1 { Par::Seq } else { Par::Rayon };
                for op in &ops {
                    eprint!("\r\x1b[2K{op} {rows}x{cols} threads={t} ...");
                    let _ = std::io::stderr().flush();
                    let p = params(op);
                    let bytes = (rows * cols * 4) as f64;
                    let mut push = |imp: &str, secs: f64| {
                        records.push(Record {
                            dtype: "f32",
                            op: op.clone(),
                            rows,
                            cols,
                            threads: t,
                            imp: imp.into(),
                            median_s: secs,
                            gb_per_s: bytes / secs / 1e9,
                            extra: Vec::new(),
                        })
                    };
                    let secs = time(
                        || {
                            sample::<f32, f32>(
                                View::rows(&x, rows, cols).expect("view"),
                                Draw::Counter { seeds: &seeds, step: 0 },
                                &mut toks,
                                None,
                                &p.par(par),
                            )
                            .expect("sample");
                        },
                        budget,
                        max_iters,
                    );
                    push("smax", secs);
                    let secs = time(
                        || {
                            let v: Vec<u32> =
                                x.par_chunks(cols).zip(us.par_iter()).map(|(r, &u)| sort_row(r, &p, u)).collect();
                            std::hint::black_box(v);
                        },
                        budget,
                        max_iters.min(10),
                    );
                    push("sort", secs);
                    if let Some(mut c) = peers::candle_sampler(&x, rows, cols, p.top_k, p.top_p) {
                        push("candle", time(|| c.run(), budget, max_iters.min(5)));
                    }
                }
                Ok(())
            })?;
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

/// Softmax over all experts, then the top k by a full sort (ties to the lower index).
fn sort_gate(h: &[f32], k: usize, ex: &mut [u32], w: &mut [f32]) {
    let m = h.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f32> = h.iter().map(|&v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    let mut idx: Vec<usize> = (0..h.len()).collect();
    idx.sort_by(|&a, &b| e[b].partial_cmp(&e[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    for j in 0..k {
        ex[j] = idx[j] as u32;
        w[j] = e[idx[j]] / s;
    }
}

fn bench_gate(
    tokens: usize,
    e: usize,
    k: usize,
    threads: &[usize],
    budget: f64,
    max_iters: usize,
    records: &mut Vec<Record>,
) -> Result<(), String> {
    let mut h = vec![0.0f32; tokens * e];
    fill_logits(&mut h, 21);
    let mut ex = vec![0u32; tokens * k];
    let mut w = vec![0.0f32; tokens * k];
    for &t in threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().map_err(|e| e.to_string())?;
        pool.install(|| {
            eprint!("\r\x1b[2Kgate {tokens}x{e} k={k} threads={t} ...");
            let par = if t == 1 { Par::Seq } else { Par::Rayon };
            let p = smax::gate::GateOptions { k, ..Default::default() };
            let bytes = (tokens * e * 4) as f64;
            let secs = time(
                || {
                    smax::gate::gate(View::rows(&h, tokens, e).expect("view"), None, &mut ex, &mut w, &p.par(par))
                        .expect("gate");
                },
                budget,
                max_iters,
            );
            let mut push = |imp: &str, secs: f64| {
                records.push(Record {
                    dtype: "f32",
                    op: "gate".into(),
                    rows: tokens,
                    cols: e,
                    threads: t,
                    imp: imp.into(),
                    median_s: secs,
                    gb_per_s: bytes / secs / 1e9,
                    extra: vec![("k", k.to_string())],
                })
            };
            push("smax", secs);
            let secs = time(
                || {
                    h.par_chunks(e)
                        .zip(ex.par_chunks_mut(k).zip(w.par_chunks_mut(k)))
                        .for_each(|(r, (x, y))| sort_gate(r, k, x, y));
                },
                budget,
                max_iters,
            );
            push("sort", secs);
        });
    }
    Ok(())
}
