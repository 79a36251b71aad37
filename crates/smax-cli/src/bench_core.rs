//! `smax bench core`: every normaliser side by side in one run, into preallocated outputs,
//! against the naive loop, the peers and the copy / read rooflines.

use crate::measure::{
    Args, Record, fill_logits, par_copy, par_read, parse_shape, pick_ops, print_table, time, timing, write_json,
};
use crate::peers;
use rayon::prelude::*;
use smax::{Algorithm, Options, Par, View, ViewMut};
use std::io::Write;

const OPS: [&str; 5] = ["softmax", "log_softmax", "logsumexp", "softmax_backward", "log_softmax_backward"];
const IN_CACHE: [(usize, usize); 2] = [(4096, 128), (64, 4096)];
const BIG: [(usize, usize); 5] = [(65536, 1024), (2048, 32768), (512, 131072), (64, 1048576), (4, 16777216)];

fn naive_softmax(x: &[f32], y: &mut [f32], cols: usize, log: bool) {
    x.par_chunks(cols).zip(y.par_chunks_mut(cols)).for_each(|(a, b)| {
        let m = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut s = 0.0f32;
        if log {
            for &v in a {
                s += (v - m).exp();
            }
            let ls = s.ln();
            for (o, &v) in b.iter_mut().zip(a) {
                *o = v - m - ls;
            }
        } else {
            for (o, &v) in b.iter_mut().zip(a) {
                *o = (v - m).exp();
                s += *o;
            }
            let c = 1.0 / s;
            for o in b.iter_mut() {
                *o *= c;
            }
        }
    });
}

fn naive_lse(x: &[f32], out: &mut [f32], cols: usize) {
    x.par_chunks(cols).zip(out.par_iter_mut()).for_each(|(a, o)| {
        let m = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let s: f32 = a.iter().map(|&v| (v - m).exp()).sum();
        *o = m + s.ln();
    });
}

fn naive_bwd(y: &[f32], dy: &[f32], dx: &mut [f32], cols: usize, log: bool) {
    y.par_chunks(cols).zip(dy.par_chunks(cols)).zip(dx.par_chunks_mut(cols)).for_each(|((a, g), o)| {
        if log {
            let s: f32 = g.iter().sum();
            for ((o, &a), &g) in o.iter_mut().zip(a).zip(g) {
                *o = g - a.exp() * s;
            }
        } else {
            let d: f32 = a.iter().zip(g).map(|(p, q)| p * q).sum();
            for ((o, &a), &g) in o.iter_mut().zip(a).zip(g) {
                *o = a * (g - d);
            }
        }
    });
}

/// The core suite: every normaliser at every shape, dtype and thread count asked for.
pub fn run(a: Args) -> Result<(), String> {
    let (budget, max_iters) = timing(&a);
    let ops = pick_ops(&a.op, &OPS, "core")?;
    let dtypes: Vec<&'static str> = if a.dtype.is_empty() {
        vec!["f32"]
    } else {
        a.dtype
            .iter()
            .map(|d| match d.as_str() {
                "f32" => Ok("f32"),
                "bf16" => Ok("bf16"),
                "f16" => Ok("f16"),
                _ => Err(format!("unknown dtype {d:?} (known: f32, bf16, f16)")),
            })
            .collect::<Result<_, _>>()?
    };
    let shapes: Vec<(usize, usize)> = if a.shape.is_empty() {
        if a.quick {
            vec![IN_CACHE[0], IN_CACHE[1], BIG[1], BIG[4]]
        } else {
            IN_CACHE.iter().chain(BIG.iter()).copied().collect()
        }
    } else {
        a.shape.iter().map(|s| parse_shape(s)).collect::<Result<_, _>>()?
    };
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads: Vec<usize> =
        if a.threads.is_empty() { if ncpu > 1 { vec![1, ncpu] } else { vec![1] } } else { a.threads.clone() };
    let mut records: Vec<Record> = Vec::new();
    let total_cfg = shapes.len() * threads.len() * ops.len();
    let mut done = 0usize;
    eprintln!(
        "smax bench: simd {}, {} ops x {} shapes x {} thread counts, {:.2}s per record",
        smax::SimdLevel::default_level().name(),
        ops.len(),
        shapes.len(),
        threads.len(),
        budget
    );
    for &(rows, cols) in &shapes {
        let n = rows.checked_mul(cols).ok_or("shape too large")?;
        let mut x = vec![0.0f32; n];
        fill_logits(&mut x, 1);
        let mut dy = vec![0.0f32; n];
        fill_logits(&mut dy, 2);
        let mut b = Bufs::<f32>::new(&x, &dy, rows, cols)?;
        drop((x, dy));
        for &t in &threads {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().map_err(|e| e.to_string())?;
            pool.install(|| -> Result<(), String> {
                let par = if t == 1 { Par::Seq } else { Par::Rayon };
                // Rooflines for this shape and thread count.
                let t_copy = time(|| par_copy(&b.x, &mut b.dx), budget, max_iters);
                let t_read = time(
                    || {
                        std::hint::black_box(par_read(&b.x));
                    },
                    budget,
                    max_iters,
                );
                for op in ops.iter().filter(|_| dtypes.contains(&"f32")) {
                    done += 1;
                    eprint!("\r\x1b[2K[{done}/{total_cfg}] {op} {rows}x{cols} threads={t} ...");
                    let _ = std::io::stderr().flush();
                    let mut push = |imp: &str, secs: f64, bytes: usize| {
                        records.push(Record {
                            dtype: "f32",
                            op: op.clone(),
                            rows,
                            cols,
                            threads: t,
                            imp: imp.to_string(),
                            median_s: secs,
                            gb_per_s: bytes as f64 / secs / 1e9,
                            extra: Vec::new(),
                        });
                    };
                    let bytes = match op.as_str() {
                        "softmax" | "log_softmax" => 2 * n * 4,
                        "logsumexp" => n * 4 + rows * 4,
                        _ => 3 * n * 4,
                    };
                    if op == "logsumexp" {
                        push("read", t_read, n * 4);
                    } else {
                        push("copy", t_copy, 2 * n * 4);
                    }
                    time_smax(op, &mut b, (rows, cols), par, (budget, max_iters), |imp, secs| push(imp, secs, bytes));
                    let Bufs { x, dy, y, yl, dx, out } = &mut b;
                    match op.as_str() {
                        "softmax" | "log_softmax" => {
                            let log = op == "log_softmax";
                            push("naive", time(|| naive_softmax(x, dx, cols, log), budget, max_iters), bytes);
                            if let (false, Some(mut p)) = (log, peers::candle(x, rows, cols)) {
                                push("candle", time(|| p.run(), budget, max_iters.min(10)), bytes);
                            }
                            if let Some(mut p) = peers::rten(x, rows, cols, log) {
                                push("rten", time(|| p.run(), budget, max_iters), bytes);
                            }
                        }
                        "logsumexp" => push("naive", time(|| naive_lse(x, out, cols), budget, max_iters), bytes),
                        _ => {
                            let log = op == "log_softmax_backward";
                            let yy: &[f32] = if log { yl } else { y };
                            push("naive", time(|| naive_bwd(yy, dy, dx, cols, log), budget, max_iters), bytes);
                        }
                    }
                }
                for d in &dtypes {
                    type Narrow = fn(
                        &'static str,
                        &[f32],
                        &[f32],
                        usize,
                        usize,
                        &[String],
                        usize,
                        Par,
                        (f64, usize),
                        &mut Vec<Record>,
                    ) -> Result<(), String>;
                    let run: Narrow = match *d {
                        "bf16" => narrow::<smax::bf16>,
                        "f16" => narrow::<smax::f16>,
                        _ => continue,
                    };
                    run(d, &b.x, &b.dy, rows, cols, &ops, t, par, (budget, max_iters), &mut records)?;
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

/// The buffers smax's algorithms are timed on, of one element type: `x` and `dy` the inputs,
/// `y` / `yl` the softmax / log-softmax of `x` (the backward inputs), `dx` and `out` outputs.
struct Bufs<T> {
    x: Vec<T>,
    dy: Vec<T>,
    y: Vec<T>,
    yl: Vec<T>,
    dx: Vec<T>,
    out: Vec<T>,
}

impl<T: smax::Element> Bufs<T> {
    fn new(x32: &[f32], dy32: &[f32], rows: usize, cols: usize) -> Result<Self, String> {
        let conv = |v: &[f32]| v.iter().map(|&a| T::from_f32(a)).collect::<Vec<T>>();
        let n = rows * cols;
        let mut b = Bufs {
            x: conv(x32),
            dy: conv(dy32),
            y: vec![T::default(); n],
            yl: vec![T::default(); n],
            dx: vec![T::default(); n],
            out: vec![T::default(); rows],
        };
        let e = |e: smax::Error| e.to_string();
        let o = Options::default();
        smax::softmax(View::rows(&b.x, rows, cols).map_err(e)?, ViewMut::rows(&mut b.y, rows, cols).map_err(e)?, &o)
            .map_err(e)?;
        smax::log_softmax(
            View::rows(&b.x, rows, cols).map_err(e)?,
            ViewMut::rows(&mut b.yl, rows, cols).map_err(e)?,
            &o,
        )
        .map_err(e)?;
        Ok(b)
    }
}

/// Times smax on `op` over `b` and pushes `(impl, seconds)`: every algorithm for the forward ops,
/// the one backward pass for the backward ops.
fn time_smax<T: smax::Element>(
    op: &str,
    b: &mut Bufs<T>,
    (rows, cols): (usize, usize),
    par: Par,
    (budget, max_iters): (f64, usize),
    mut push: impl FnMut(&str, f64),
) {
    let algs = [
        ("smax", Algorithm::Auto),
        ("smax-three-pass", Algorithm::ThreePass),
        ("smax-two-pass", Algorithm::TwoPass),
        ("smax-online", Algorithm::Online),
    ];
    let Bufs { x, dy, y, yl, dx, out } = b;
    match op {
        "softmax" | "log_softmax" | "logsumexp" => {
            for (name, alg) in algs {
                let o = Options::default().algorithm(alg).par(par);
                let secs = time(
                    || {
                        let xv = View::rows(x, rows, cols).expect("view");
                        let r = match op {
                            "logsumexp" => smax::logsumexp(xv, out, &o),
                            "log_softmax" => smax::log_softmax(xv, ViewMut::rows(dx, rows, cols).expect("view"), &o),
                            _ => smax::softmax(xv, ViewMut::rows(dx, rows, cols).expect("view"), &o),
                        };
                        r.expect("smax");
                    },
                    budget,
                    max_iters,
                );
                push(name, secs);
            }
        }
        _ => {
            let log = op == "log_softmax_backward";
            let yy: &[T] = if log { yl } else { y };
            let o = Options::default().par(par);
            let secs = time(
                || {
                    let yv = View::rows(yy, rows, cols).expect("view");
                    let gv = View::rows(dy, rows, cols).expect("view");
                    let dv = ViewMut::rows(dx, rows, cols).expect("view");
                    let r = if log {
                        smax::log_softmax_backward(yv, gv, dv, &o)
                    } else {
                        smax::softmax_backward(yv, gv, dv, &o)
                    };
                    r.expect("smax");
                },
                budget,
                max_iters,
            );
            push("smax", secs);
        }
    }
}

/// `--dtype bf16` / `f16`: smax's algorithms on buffers of `T` (converted from the f32
/// inputs), against a copy and a read of the same number of bytes.
#[allow(clippy::too_many_arguments)]
fn narrow<T: smax::Element>(
    dtype: &'static str,
    x32: &[f32],
    dy32: &[f32],
    rows: usize,
    cols: usize,
    ops: &[String],
    threads: usize,
    par: Par,
    timing: (f64, usize),
    records: &mut Vec<Record>,
) -> Result<(), String> {
    let (budget, max_iters) = timing;
    let n = rows * cols;
    let sz = std::mem::size_of::<T>();
    let mut b = Bufs::<T>::new(x32, dy32, rows, cols)?;
    // The rooflines move the same bytes as f32 buffers of n·size/4 elements.
    let same = n * sz / 4;
    let mut tmp = vec![0.0f32; same];
    let t_copy = time(|| par_copy(&x32[..same], &mut tmp), budget, max_iters);
    let t_read = time(
        || {
            std::hint::black_box(par_read(&x32[..same]));
        },
        budget,
        max_iters,
    );
    for op in ops {
        let mut push = |imp: &str, secs: f64, bytes: usize| {
            records.push(Record {
                dtype,
                op: op.clone(),
                rows,
                cols,
                threads,
                imp: imp.to_string(),
                median_s: secs,
                gb_per_s: bytes as f64 / secs / 1e9,
                extra: Vec::new(),
            });
        };
        let bytes = match op.as_str() {
            "softmax" | "log_softmax" => 2 * n * sz,
            "logsumexp" => n * sz + rows * sz,
            _ => 3 * n * sz,
        };
        if op == "logsumexp" {
            push("read", t_read, n * sz);
        } else {
            push("copy", t_copy, 2 * n * sz);
        }
        time_smax(op, &mut b, (rows, cols), par, timing, |imp, secs| push(imp, secs, bytes));
    }
    Ok(())
}
