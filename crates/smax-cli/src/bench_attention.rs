//! `smax bench attention`: flash attention side by side (`op` = `attention_fwd`,
//! `attention_fwd_bwd` or `attention_decode`; rows = queries, cols = keys; batch 1, 8 heads,
//! f32). `smax` is [`smax::attention::attention`] (and its backward); `naive` the materialised
//! path, one head at a time (the `gemm` crate for `QKᵀ`, smax's softmax over the full score
//! matrix, `gemm` for `PV`; backward: the five products and smax's softmax backward); `candle`
//! candle-nn's CPU flash attention (`flash_attn`, forward only: it has no backward). Decoding
//! (one query, a 32k cache): smax's split-K against its one-pass forward and the unified-max
//! variant. Records carry `gflops` (`4·seq²·d·heads` per forward, half for causal; forward +
//! backward counted as 3.5 forwards) and `peak_extra_bytes`.

use crate::alloc::peak_extra;
use crate::measure::{Args, Record, fill_logits, parse_shape, pick_ops, print_table, time, timing, write_json};
use crate::peers;
use smax::attention::{
    AttentionGrads, AttentionOptions, AttentionShape, HeadStrides, Heads, SplitK, UnifiedMax, attention,
    attention_backward, attention_decode, attention_decode_unified,
};
use smax::{MaskedRow, Options, View, ViewMut};
use std::io::Write;

const OPS: [&str; 3] = ["attention_fwd", "attention_fwd_bwd", "attention_decode"];
const HEADS: usize = 8;
/// (seq, head_dim) of the list.
const SHAPES: [(usize, usize); 6] = [(512, 64), (512, 128), (2048, 64), (2048, 128), (8192, 64), (8192, 128)];
const QUICK: [(usize, usize); 2] = [(512, 64), (2048, 128)];
const DECODE_KV: usize = 32768;

/// `c (m x n) [+]= a (m x k) · b (k x n)` with explicit strides, through the `gemm` crate on
/// the current rayon pool.
#[allow(clippy::too_many_arguments)]
fn mm(
    c: &mut [f32],
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    m: usize,
    k: usize,
    n: usize,
    acc: bool,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(m > 0 && k > 0 && n > 0);
    assert!(last(m, k, a_rs, a_cs) < a.len() && last(k, n, b_rs, b_cs) < b.len() && m * n <= c.len());
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
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// Upstream gradient and the three gradient buffers of the naive backward.
type Grads<'a> = (&'a [f32], &'a mut [f32], &'a mut [f32], &'a mut [f32]);

/// The naive materialised path over `[heads, seq, d]` buffers, one head at a time; with `bwd`,
/// also the backward. Scratch: the score matrix and its gradient (`2·seq²` floats).
struct Naive {
    s: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
}

impl Naive {
    fn new(seq: usize, bwd: bool) -> Self {
        Naive { s: vec![0.0; seq * seq], p: vec![0.0; seq * seq], dp: vec![0.0; if bwd { seq * seq } else { 0 }] }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        seq: usize,
        d: usize,
        kvh: usize,
        causal: bool,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        grads: Option<Grads<'_>>,
    ) {
        let scale = 1.0 / (d as f32).sqrt();
        let n = seq * seq;
        let g = HEADS / kvh;
        let mut grads = grads;
        for h in 0..HEADS {
            let hk = h / g;
            // Grouped heads sum their key/value gradients.
            let acc = h % g != 0;
            let (qh, kh, vh) =
                (&q[h * seq * d..][..seq * d], &k[hk * seq * d..][..seq * d], &v[hk * seq * d..][..seq * d]);
            mm(&mut self.s, qh, d, 1, kh, 1, d, seq, d, seq, false);
            for (i, r) in self.s.chunks_mut(seq).enumerate() {
                for x in r.iter_mut() {
                    *x *= scale;
                }
                if causal {
                    r[i + 1..].fill(f32::NEG_INFINITY);
                }
            }
            let o = Options::default().masked_row(MaskedRow::Zero);
            smax::softmax(
                View::rows(&self.s, seq, seq).expect("view"),
                ViewMut::rows(&mut self.p, seq, seq).expect("view"),
                &o,
            )
            .expect("softmax");
            mm(&mut out[h * seq * d..][..seq * d], &self.p, seq, 1, vh, d, 1, seq, seq, d, false);
            if let Some((dout, dq, dk, dv)) = grads.as_mut() {
                let doh = &dout[h * seq * d..][..seq * d];
                // dV = Pᵀ dO; dP = dO Vᵀ; dS = softmax_backward(P, dP); dQ = dS K·c; dK = dSᵀ Q·c.
                mm(&mut dv[hk * seq * d..][..seq * d], &self.p, 1, seq, doh, d, 1, seq, seq, d, acc);
                mm(&mut self.dp, doh, d, 1, vh, 1, d, seq, d, seq, false);
                smax::softmax_backward(
                    View::rows(&self.p, seq, seq).expect("view"),
                    View::rows(&self.dp, seq, seq).expect("view"),
                    ViewMut::rows(&mut self.s, seq, seq).expect("view"),
                    &Options::default(),
                )
                .expect("softmax_backward");
                for x in self.s[..n].iter_mut() {
                    *x *= scale;
                }
                mm(&mut dq[h * seq * d..][..seq * d], &self.s, seq, 1, kh, d, 1, seq, seq, d, false);
                mm(&mut dk[hk * seq * d..][..seq * d], &self.s, 1, seq, qh, d, 1, seq, seq, d, acc);
            }
        }
    }
}

fn gflops(seq: usize, kv: usize, d: usize, causal: bool, bwd: bool) -> f64 {
    let f = 4.0 * seq as f64 * kv as f64 * d as f64 * HEADS as f64 * if causal { 0.5 } else { 1.0 };
    f * if bwd { 3.5 } else { 1.0 } / 1e9
}

/// Median seconds: the usual budgeted timing, or a single cold run for calls over ~3 s.
fn timed<F: FnMut()>(mut f: F, budget: f64, max_iters: usize) -> f64 {
    let t = std::time::Instant::now();
    f();
    let once = t.elapsed().as_secs_f64();
    if once > 3.0 {
        return once;
    }
    time(f, budget, max_iters)
}

#[allow(clippy::too_many_arguments)]
fn push(
    records: &mut Vec<Record>,
    op: &str,
    seq: usize,
    kv: usize,
    d: usize,
    causal: bool,
    t: usize,
    imp: &str,
    s: f64,
    bytes: f64,
    gf: f64,
    peak: Option<usize>,
) {
    let mut extra = vec![
        ("batch", "1".to_string()),
        ("heads", HEADS.to_string()),
        ("seq", seq.to_string()),
        ("head_dim", d.to_string()),
        ("causal", causal.to_string()),
        ("gflops", format!("{:.2}", gf / s)),
    ];
    if let Some(p) = peak {
        extra.push(("peak_extra_bytes", p.to_string()));
    }
    records.push(Record {
        dtype: "f32",
        op: op.into(),
        rows: seq,
        cols: kv,
        threads: t,
        imp: imp.into(),
        median_s: s,
        gb_per_s: bytes / s / 1e9,
        extra,
    });
}

pub fn run(a: Args) -> Result<(), String> {
    let (budget, max_iters) = timing(&a);
    let ops = pick_ops(&a.op, &OPS, "attention")?;
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads: Vec<usize> = if a.threads.is_empty() { vec![ncpu] } else { a.threads.clone() };
    let shapes: Vec<(usize, usize)> = if a.shape.is_empty() {
        if a.quick { QUICK.to_vec() } else { SHAPES.to_vec() }
    } else {
        a.shape.iter().map(|s| parse_shape(s)).collect::<Result<_, _>>()?
    };
    let kvh = a.kv_heads;
    if kvh == 0 || !HEADS.is_multiple_of(kvh) {
        return Err(format!("--kv-heads {kvh}: must divide the {HEADS} query heads"));
    }
    eprintln!(
        "smax bench attention: simd {}, threads {:?}, batch 1, {HEADS} query heads, {kvh} key/value heads, shapes SEQxHEAD_DIM {:?}",
        smax::SimdLevel::default_level().name(),
        threads,
        shapes
    );
    let mut records = Vec::new();
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().map_err(|e| e.to_string())?;
        pool.install(|| -> Result<(), String> {
            for &(seq, d) in &shapes {
                let n = HEADS * seq * d;
                let nk = kvh * seq * d;
                let mut q = vec![0.0f32; n];
                let mut k = vec![0.0f32; nk];
                let mut v = vec![0.0f32; nk];
                fill_logits(&mut q, 1);
                fill_logits(&mut k, 2);
                fill_logits(&mut v, 3);
                for x in q.iter_mut().chain(k.iter_mut()) {
                    *x *= 0.1;
                }
                let shape = AttentionShape::new(1, HEADS, seq, seq, d).kv_heads(kvh);
                let bytes = 4.0 * (2 * n + 2 * nk) as f64;
                for causal in [false, true] {
                    let opts = AttentionOptions::default().causal(causal);
                    if ops.iter().any(|o| o == "attention_fwd") {
                        eprint!("\r\x1b[2Kattention_fwd {seq}x{d} causal={causal} t={t}");
                        let _ = std::io::stderr().flush();
                        let gf = gflops(seq, seq, d, causal, false);
                        let mut out = vec![0.0f32; n];
                        let mut lse = vec![0.0f32; HEADS * seq];
                        let (_, peak) = peak_extra(|| {
                            attention(
                                smax::attention::AttentionInputs::new(
                                    shape,
                                    Heads::new(&q),
                                    Heads::new(&k),
                                    Heads::new(&v),
                                ),
                                smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
                                &opts,
                            )
                        });
                        let s = timed(
                            || {
                                attention(
                                    smax::attention::AttentionInputs::new(
                                        shape,
                                        Heads::new(&q),
                                        Heads::new(&k),
                                        Heads::new(&v),
                                    ),
                                    smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
                                    &opts,
                                )
                                .expect("attention");
                            },
                            budget,
                            max_iters,
                        );
                        push(&mut records, "attention_fwd", seq, seq, d, causal, t, "smax", s, bytes, gf, Some(peak));
                        let mut nv = Naive::new(seq, false);
                        let mut out2 = vec![0.0f32; n];
                        let (_, npeak) =
                            peak_extra(|| Naive::new(seq, false).run(seq, d, kvh, causal, &q, &k, &v, &mut out2, None));
                        let s = timed(|| nv.run(seq, d, kvh, causal, &q, &k, &v, &mut out2, None), budget, max_iters);
                        push(&mut records, "attention_fwd", seq, seq, d, causal, t, "naive", s, bytes, gf, Some(npeak));
                        let diff = out.iter().zip(&out2).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                        if diff > 1e-4 {
                            return Err(format!("attention_fwd {seq}x{d}: smax and naive differ by {diff}"));
                        }
                        // candle reads [b, s, h, d]: the same numbers re-laid out; smax reads that
                        // layout in place too (strided heads), timed beside it.
                        let peer =
                            if kvh == HEADS { peers::candle_flash(&q, &k, &v, HEADS, seq, d, causal) } else { None };
                        if let Some(mut peer) = peer {
                            let s = timed(|| peer.run(), budget, max_iters);
                            push(&mut records, "attention_fwd", seq, seq, d, causal, t, "candle", s, bytes, gf, None);
                            let (qb, kb, vb) = (to_bshd(&q, seq, d), to_bshd(&k, seq, d), to_bshd(&v, seq, d));
                            let st = HeadStrides::bshd(HEADS, seq, d);
                            let s = timed(
                                || {
                                    attention(
                                        smax::attention::AttentionInputs::new(
                                            shape,
                                            Heads::strided(&qb, st),
                                            Heads::strided(&kb, st),
                                            Heads::strided(&vb, st),
                                        ),
                                        smax::attention::AttentionOutputs::new(&mut out, None),
                                        &opts,
                                    )
                                    .expect("attention");
                                },
                                budget,
                                max_iters,
                            );
                            push(
                                &mut records,
                                "attention_fwd",
                                seq,
                                seq,
                                d,
                                causal,
                                t,
                                "smax-bshd",
                                s,
                                bytes,
                                gf,
                                None,
                            );
                        }
                    }
                    if ops.iter().any(|o| o == "attention_fwd_bwd") {
                        eprint!("\r\x1b[2Kattention_fwd_bwd {seq}x{d} causal={causal} t={t}");
                        let _ = std::io::stderr().flush();
                        let gf = gflops(seq, seq, d, causal, true);
                        let mut dout = vec![0.0f32; n];
                        fill_logits(&mut dout, 4);
                        let (mut out, mut lse) = (vec![0.0f32; n], vec![0.0f32; HEADS * seq]);
                        let (mut dq, mut dk, mut dv) = (vec![0.0f32; n], vec![0.0f32; nk], vec![0.0f32; nk]);
                        let mut step = || {
                            attention(
                                smax::attention::AttentionInputs::new(
                                    shape,
                                    Heads::new(&q),
                                    Heads::new(&k),
                                    Heads::new(&v),
                                ),
                                smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
                                &opts,
                            )
                            .expect("attention");
                            attention_backward(
                                smax::attention::AttentionInputs::new(
                                    shape,
                                    Heads::new(&q),
                                    Heads::new(&k),
                                    Heads::new(&v),
                                ),
                                &out,
                                &lse,
                                &dout,
                                AttentionGrads::new(&mut dq, &mut dk, &mut dv),
                                &opts,
                            )
                            .expect("backward");
                        };
                        let (_, peak) = peak_extra(&mut step);
                        let s = timed(step, budget, max_iters);
                        push(
                            &mut records,
                            "attention_fwd_bwd",
                            seq,
                            seq,
                            d,
                            causal,
                            t,
                            "smax",
                            s,
                            bytes * 2.0,
                            gf,
                            Some(peak),
                        );
                        let mut nv = Naive::new(seq, true);
                        let (mut o2, mut dq2, mut dk2, mut dv2) =
                            (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; nk], vec![0.0f32; nk]);
                        let (_, npeak) = peak_extra(|| {
                            Naive::new(seq, true).run(
                                seq,
                                d,
                                kvh,
                                causal,
                                &q,
                                &k,
                                &v,
                                &mut o2,
                                Some((&dout, &mut dq2, &mut dk2, &mut dv2)),
                            )
                        });
                        let s = timed(
                            || {
                                nv.run(
                                    seq,
                                    d,
                                    kvh,
                                    causal,
                                    &q,
                                    &k,
                                    &v,
                                    &mut o2,
                                    Some((&dout, &mut dq2, &mut dk2, &mut dv2)),
                                )
                            },
                            budget,
                            max_iters,
                        );
                        push(
                            &mut records,
                            "attention_fwd_bwd",
                            seq,
                            seq,
                            d,
                            causal,
                            t,
                            "naive",
                            s,
                            bytes * 2.0,
                            gf,
                            Some(npeak),
                        );
                        let rel = |a: &[f32], b: &[f32]| {
                            let m = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                            a.iter().zip(b).fold(0.0f32, |mx, (x, y)| mx.max((x - y).abs())) / m.max(1e-30)
                        };
                        let worst = rel(&dq, &dq2).max(rel(&dk, &dk2)).max(rel(&dv, &dv2));
                        if worst > 1e-3 {
                            return Err(format!("attention_fwd_bwd {seq}x{d}: gradients differ by {worst} (relative)"));
                        }
                    }
                }
            }
            if ops.iter().any(|o| o == "attention_decode") && kvh == HEADS {
                // (query heads, key/value heads, head_dim); the grouped case shows the packing of a
                // group's query heads (the cache read once per group).
                for (heads, kvh, d) in [(HEADS, HEADS, 64usize), (HEADS, HEADS, 128), (HEADS, 2, 128), (1, 1, 128)] {
                    bench_decode(heads, kvh, d, t, budget, max_iters, &mut records);
                }
            }
            Ok(())
        })?;
    }
    eprintln!("\r\x1b[2Kdone: {} records", records.len());
    print_table(&records);
    if let Some(path) = a.json {
        write_json(&path, &records).map_err(|e| format!("writing {path}: {e}"))?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

/// `[h, s, d]` → `[s, h, d]`.
fn to_bshd(x: &[f32], seq: usize, d: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    for h in 0..HEADS {
        for s in 0..seq {
            y[(s * HEADS + h) * d..][..d].copy_from_slice(&x[(h * seq + s) * d..][..d]);
        }
    }
    y
}

/// One query per head against a 32k cache: split-K (2048 keys per split, a group's query heads
/// packed), the one-pass forward (which can only spread the heads over the threads, and reads
/// a shared key/value head once per query head), the unified max, and `read`, a plain parallel
/// sum over the same K and V bytes (the memory roofline: decoding reads the cache once).
fn bench_decode(
    heads: usize,
    kvh: usize,
    d: usize,
    t: usize,
    budget: f64,
    max_iters: usize,
    records: &mut Vec<Record>,
) {
    eprint!("\r\x1b[2Kattention_decode heads={heads}/{kvh} kv={DECODE_KV} d={d} t={t}");
    let _ = std::io::stderr().flush();
    let kv = DECODE_KV;
    let shape = AttentionShape::new(1, heads, 1, kv, d).kv_heads(kvh);
    let mut q = vec![0.0f32; heads * d];
    let mut k = vec![0.0f32; kvh * kv * d];
    let mut v = vec![0.0f32; kvh * kv * d];
    fill_logits(&mut q, 5);
    fill_logits(&mut k, 6);
    fill_logits(&mut v, 7);
    for x in q.iter_mut().chain(k.iter_mut()) {
        *x *= 0.1;
    }
    let bytes = 4.0 * (2 * kvh * kv * d) as f64;
    let gf = 4.0 * kv as f64 * d as f64 * heads as f64 / 1e9;
    let rec = |records: &mut Vec<Record>, imp: &str, s: f64| {
        records.push(Record {
            dtype: "f32",
            op: "attention_decode".into(),
            rows: 1,
            cols: kv,
            threads: t,
            imp: imp.into(),
            median_s: s,
            gb_per_s: bytes / s / 1e9,
            extra: vec![
                ("batch", "1".to_string()),
                ("heads", heads.to_string()),
                ("kv_heads", kvh.to_string()),
                ("seq", "1".to_string()),
                ("head_dim", d.to_string()),
                ("causal", "false".to_string()),
                ("gflops", format!("{:.2}", gf / s)),
            ],
        })
    };
    let s = time(
        || {
            std::hint::black_box(crate::measure::par_read(&k) + crate::measure::par_read(&v));
        },
        budget,
        max_iters,
    );
    rec(records, "read", s);
    let opts = AttentionOptions::default();
    let mut out = vec![0.0f32; heads * d];
    let s = time(
        || {
            attention_decode(
                smax::attention::AttentionInputs::new(shape, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
                smax::attention::AttentionOutputs::new(&mut out, None),
                &opts.with_variant(SplitK::default()),
            )
            .expect("decode")
        },
        budget,
        max_iters,
    );
    rec(records, "smax", s);
    let s = time(
        || {
            attention(
                smax::attention::AttentionInputs::new(shape, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
                smax::attention::AttentionOutputs::new(&mut out, None),
                &opts,
            )
            .expect("attention")
        },
        budget,
        max_iters,
    );
    rec(records, "smax-one-pass", s);
    // φ: the low end of these inputs' score range (about ±3).
    let um = UnifiedMax::new(-3.0);
    let mut fallbacks = 0;
    let s = time(
        || {
            fallbacks = attention_decode_unified(
                smax::attention::AttentionInputs::new(shape, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
                smax::attention::AttentionOutputs::new(&mut out, None),
                &opts.with_variant(smax::attention::UnifiedDecode { split: SplitK::default(), max: um }),
            )
            .expect("unified")
            .fallback_rows;
        },
        budget,
        max_iters,
    );
    rec(records, "smax-unified", s);
    if let Some(r) = records.last_mut() {
        r.extra.push(("fallback_rows", fallbacks.to_string()));
    }
}
