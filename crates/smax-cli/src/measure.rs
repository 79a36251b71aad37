//! What every `smax bench` suite shares: the command's arguments, the JSON record, timing,
//! shape parsing, synthetic logits, the copy / read rooflines, the table and the JSON writer.
//!
//! Bytes counted: the input read once plus the output written once (logsumexp: the input plus
//! one value per row; backward: `y` and `dy` read plus `dx` written). `copy` is a plain copy of
//! the input into the output buffer (the read+write roofline); `read` is a plain sum of the
//! input (the read roofline). Ratios are taken against those rooflines measured in the same
//! run, with the same thread count.

use rayon::prelude::*;
use std::time::{Duration, Instant};

/// Which family to benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// The normalisers: softmax, log_softmax, logsumexp and their backward passes.
    Core,
    /// The losses: cross-entropy over given logits, and the linear cross-entropy.
    Loss,
    /// Decoding: top-k, top-p and min-p sampling.
    Decode,
    /// Attention: flash attention forward, forward+backward, and split-K decoding.
    Attention,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The family to time.
    #[arg(value_enum, default_value_t = Suite::Core)]
    pub suite: Suite,
    /// Short run: fewer repetitions, two in-cache shapes and two large ones.
    #[arg(long)]
    pub quick: bool,
    /// Ops to run (softmax, log_softmax, logsumexp, softmax_backward, log_softmax_backward);
    /// repeatable or comma-separated. Default: all.
    #[arg(long, value_delimiter = ',')]
    pub op: Vec<String>,
    /// Shapes ROWSxCOLS; repeatable or comma-separated. Default: the list.
    #[arg(long, value_delimiter = ',')]
    pub shape: Vec<String>,
    /// Thread counts; default: 1 and all cores.
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Write the records as a JSON array to this path.
    #[arg(long)]
    pub json: Option<String>,
    /// Seconds of timing per record (default 0.6, quick 0.15).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// core only: element types to time, of f32, bf16 and f16 (default f32). bf16 and f16 run
    /// smax's algorithms against a copy / read of the same bytes; the peers and the naive loop
    /// are f32 only.
    #[arg(long, value_delimiter = ',')]
    pub dtype: Vec<String>,
    /// attention only: key/value heads of the 8 query heads (grouped-query attention; default
    /// 8). candle is skipped unless 8.
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
}

pub(crate) struct Record {
    /// Element type of the timed buffers (`f32` unless `--dtype` asks for `bf16` / `f16`).
    pub dtype: &'static str,
    pub op: String,
    pub rows: usize,
    pub cols: usize,
    pub threads: usize,
    pub imp: String,
    pub median_s: f64,
    pub gb_per_s: f64,
    /// Further JSON fields of this record (name, JSON value).
    pub extra: Vec<(&'static str, String)>,
}

/// Seconds of timing per record and the iteration cap, from `--seconds` / `--quick`.
pub(crate) fn timing(a: &Args) -> (f64, usize) {
    let budget = a.seconds.unwrap_or(if a.quick { 0.15 } else { 0.6 });
    (budget, if a.quick { 10 } else { 50 })
}

/// The ops `--op` asked for (all of `known` when none), each checked against `known`.
pub(crate) fn pick_ops(asked: &[String], known: &[&str], family: &str) -> Result<Vec<String>, String> {
    if asked.is_empty() {
        return Ok(known.iter().map(|s| s.to_string()).collect());
    }
    for o in asked {
        if !known.contains(&o.as_str()) {
            return Err(format!("unknown {family} op {o:?}; expected one of {}", known.join(", ")));
        }
    }
    Ok(asked.to_vec())
}

pub(crate) fn parse_shape(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s.split_once(['x', 'X']).ok_or_else(|| format!("shape {s:?} is not ROWSxCOLS"))?;
    let r = a.trim().parse().map_err(|_| format!("bad row count in {s:?}"))?;
    let c = b.trim().parse().map_err(|_| format!("bad column count in {s:?}"))?;
    Ok((r, c))
}

/// Deterministic pseudo-random logits: N(0, 1)·4 via a cheap generator (Irwin–Hall of 4).
pub(crate) fn fill_logits(v: &mut [f32], seed: u64) {
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(ci, c)| {
        let mut s = seed ^ (ci as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef;
        for x in c.iter_mut() {
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            *x = (acc - 2.0) * 1.732 * 4.0;
        }
    });
}

pub(crate) fn time<F: FnMut()>(mut f: F, budget: f64, max_iters: usize) -> f64 {
    f(); // warm-up (page faults, caches)
    let mut ts = Vec::new();
    let start = Instant::now();
    while ts.len() < 3 || (start.elapsed() < Duration::from_secs_f64(budget) && ts.len() < max_iters) {
        let t = Instant::now();
        f();
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    ts[ts.len() / 2]
}

const COPY_CHUNK: usize = 1 << 16;

pub(crate) fn par_copy(x: &[f32], y: &mut [f32]) {
    x.par_chunks(COPY_CHUNK).zip(y.par_chunks_mut(COPY_CHUNK)).for_each(|(a, b)| b.copy_from_slice(a));
}

/// A plain sum with 16 independent lanes (vectorises; the read roofline).
pub(crate) fn par_read(x: &[f32]) -> f32 {
    x.par_chunks(COPY_CHUNK)
        .map(|c| {
            let mut acc = [0.0f32; 16];
            let mut it = c.chunks_exact(16);
            for v in &mut it {
                for (a, b) in acc.iter_mut().zip(v) {
                    *a += *b;
                }
            }
            acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
        })
        .sum()
}

fn roofline<'a>(records: &'a [Record], r: &Record) -> Option<&'a Record> {
    let want =
        if r.op == "logsumexp" || r.op == "attention_decode" || r.imp.ends_with("-fwd") { "read" } else { "copy" };
    records.iter().find(|c| c.imp == want && same_config(c, r))
}

/// Same op, shape, threads and (for records that carry them: attention) heads, key/value heads,
/// head dimension and causality.
fn same_config(a: &Record, b: &Record) -> bool {
    let field = |rec: &Record, k: &str| rec.extra.iter().find(|e| e.0 == k).map(|e| e.1.clone());
    a.op == b.op
        && a.dtype == b.dtype
        && a.rows == b.rows
        && a.cols == b.cols
        && a.threads == b.threads
        && ["heads", "kv_heads", "head_dim", "causal"].iter().all(|k| field(a, k) == field(b, k))
}

pub(crate) fn print_table(records: &[Record]) {
    println!(
        "{:<22} {:<4} {:>16} {:>3} {:<16} {:>11} {:>8} {:>8} {:>8}",
        "op", "type", "shape", "thr", "impl", "median ms", "GB/s", "x roof", "x candle"
    );
    let mut last = String::new();
    for r in records {
        let key = format!("{} {} {}x{} {}", r.op, r.dtype, r.rows, r.cols, r.threads);
        if key != last && !last.is_empty() {
            println!();
        }
        last = key;
        let roof = roofline(records, r).map(|c| r.gb_per_s / c.gb_per_s);
        let candle = records.iter().find(|c| c.imp == "candle" && same_config(c, r)).map(|c| c.median_s / r.median_s);
        println!(
            "{:<22} {:<4} {:>16} {:>3} {:<16} {:>11.3} {:>8.2} {:>8} {:>8}",
            r.op,
            r.dtype,
            format!("{}x{}", r.rows, r.cols),
            r.threads,
            r.imp,
            r.median_s * 1e3,
            r.gb_per_s,
            roof.map(|v| format!("{v:.2}")).unwrap_or_default(),
            candle.map(|v| format!("{v:.1}")).unwrap_or_default(),
        );
        if !r.extra.is_empty() {
            let e: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{:<22}        {}", "", e.join(" "));
        }
    }
}

pub(crate) fn write_json(path: &str, records: &[Record]) -> std::io::Result<()> {
    let mut s = String::from("[\n");
    for (i, r) in records.iter().enumerate() {
        let extra: String = r.extra.iter().map(|(k, v)| format!(", \"{k}\": {v}")).collect();
        s.push_str(&format!(
            "  {{\"op\": \"{}\", \"dtype\": \"{}\", \"rows\": {}, \"cols\": {}, \"threads\": {}, \"impl\": \"{}\", \"median_s\": {:e}, \"gb_per_s\": {:.4}{}}}{}\n",
            r.op, r.dtype, r.rows, r.cols, r.threads, r.imp, r.median_s, r.gb_per_s, extra, if i + 1 < records.len() { "," } else { "" }
        ));
    }
    s.push_str("]\n");
    std::fs::write(path, s)
}
