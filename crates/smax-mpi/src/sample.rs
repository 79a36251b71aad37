//! Sampling over a vocabulary sharded across ranks.

use crate::{agree, gather, vocab_tiling};
use mpi::datatype::PartitionMut;
use mpi::traits::{Communicator, CommunicatorCollectives};
use rayon::prelude::*;
use smax::sample::{Draw, SampleOptions, SampleStats, sample};
use smax::{Error, View};

/// Sampling when each rank holds the logits of a vocabulary slice (the output layer of a
/// vocabulary-parallel model): temperature, top-k, top-p and min-p with exactly the
/// definition of [`smax::sample::sample`], and **the same token as `sample` on the gathered
/// logits for the same draw** (the same uniform, or the same seed and step), on every rank.
///
/// How: one all-gather of each rank's per-row max, unmasked count and first invalid logit
/// gives the global max (so every rank computes `t = (z − max)/T` as the single-process call
/// does); each rank then lists the tokens of its slice that can survive the filters (its own
/// top-k by `t`, ties at its k-th value included; with min-p and no top-p, only tokens within
/// min-p's margin of the max); one variable-size all-gather of those candidates `(index, z)`
/// builds, on every rank, a compact row per row (the candidates in index order, padded with
/// masked `-inf`) on which `sample` runs. The filters keep the same tokens on the compact row
/// as on the whole one (every token the kept set or top-p's renormalisation needs is a
/// candidate; ties break by index, whose order the compact row preserves), so the kept set,
/// its probabilities and the draw are the single-process ones, bit for bit.
///
/// Cost: candidates per row are about `P·k` with top-k, the tokens within min-p's margin
/// with min-p; **top-p without top-k, and plain sampling without a filter, need every token**
/// (their normalisation sums the whole row in index order), so every slice is gathered: add a
/// top-k (as serving stacks do) to keep the exchange small. Greedy (`T = 0`) sends one token
/// per rank.
///
/// Collective: every rank calls it with the same draw, options and row count. Errors (on
/// every rank): those of `sample`, with the global index of a NaN or `+inf` logit; slices
/// that do not tile `[0, V)` in rank order.
pub fn vocab_parallel_sample<C: Communicator>(
    comm: &C,
    logits: View<'_, f32>,
    vocab_start: usize,
    draw: Draw<'_>,
    tokens: &mut [u32],
    opts: &SampleOptions,
) -> Result<SampleStats, Error> {
    let lay = logits.layout();
    let (rows, cols) = (lay.row_count(), lay.row_len());
    let stride = lay.row_stride();
    // Local checks: the options (by `sample` on an empty batch), the draw and tokens lengths.
    let opts_ok =
        sample(View::rows(&[0.0f32; 0], 0, 1)?, Draw::Uniform(&[]), &mut [], None::<(smax::ViewMut<'_, f32>, _)>, opts);
    let draw_len = match draw {
        Draw::Uniform(u) => u.len(),
        Draw::Counter { seeds, .. } => seeds.len(),
    };
    let uniform_ok = match draw {
        Draw::Uniform(u) => u.iter().all(|u| (0.0..1.0).contains(u)),
        Draw::Counter { .. } => true,
    };
    let ok = opts_ok.is_ok() && stride.is_some() && tokens.len() == rows && draw_len == rows && uniform_ok;
    // Per row: local max, unmasked count, first invalid (global index or -1) and its value.
    let mut meta = vec![vocab_start as f64, cols as f64, rows as f64];
    let data = logits.data();
    let row = |r: usize| -> &[f32] {
        let s = stride.unwrap_or(0);
        if cols == 0 { &[] } else { &data[r * s..r * s + cols] }
    };
    // Rows in parallel; per row one branch-free pass that vectorises: the max (through the
    // ordered integer image), the unmasked count, and the count of NaN or +inf (then the first).
    let scan: Vec<[f64; 4]> = (0..if ok { rows } else { 0 })
        .into_par_iter()
        .map(|r| {
            let z = row(r);
            let (mut mo, mut unmasked, mut invalid) = (i32::MIN, 0usize, 0usize);
            for &x in z {
                mo = mo.max(ordered(x));
                unmasked += (x != f32::NEG_INFINITY) as usize;
                invalid += (x.is_nan() || x == f32::INFINITY) as usize;
            }
            let m = if z.is_empty() { f32::NEG_INFINITY } else { unordered(mo) };
            let first_bad = (invalid > 0).then(|| z.iter().position(|x| x.is_nan() || *x == f32::INFINITY)).flatten();
            let (bi, bv) = first_bad.map_or((-1.0, 0.0), |i| ((vocab_start + i) as f64, z[i] as f64));
            [m as f64, unmasked as f64, bi, bv]
        })
        .collect();
    for s in &scan {
        meta.extend_from_slice(s);
    }
    // The meta vectors have the same length on every rank only if the row counts agree: a
    // first round settles that.
    let shapes = agree(comm, ok, &[vocab_start as f64, cols as f64, rows as f64]);
    vocab_tiling(
        &shapes,
        "valid options, a row layout, tokens and draw of one per row, uniforms in [0, 1) on every rank",
        "row count",
    )
    .map_err(|e| opts_ok.clone().err().unwrap_or(e))?;
    let p = shapes.len();
    let all = gather(comm, &meta);
    let w = meta.len();
    let at = |k: usize, r: usize, f: usize| all[k * w + 3 + 4 * r + f];
    let mut gmax = vec![f32::NEG_INFINITY; rows];
    let mut unmasked = vec![0usize; rows];
    for r in 0..rows {
        for k in 0..p {
            if at(k, r, 2) >= 0.0 {
                return Err(Error::NonFiniteLogit { row: r, index: at(k, r, 2) as usize, value: at(k, r, 3) });
            }
            gmax[r] = gmax[r].max(at(k, r, 0) as f32);
            unmasked[r] += at(k, r, 1) as usize;
        }
        if unmasked[r] == 0 {
            return Err(Error::NoValidToken { row: r });
        }
    }
    // This rank's candidates: (global index, z) per row, index ascending. They need only be a
    // superset of the tokens of this slice that the filters can keep (or top-p's sum needs):
    // the compact rows decide exactly.
    let temp = opts.temperature;
    let top_p = opts.top_p.is_some_and(|pp| pp < 1.0);
    let lists: Vec<Vec<usize>> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let z = row(r);
            let m = gmax[r] as f64 + 0.0;
            let t = |x: f32| (x as f64 - m) / temp;
            let mut list: Vec<usize> = Vec::new();
            let top_k = opts.top_k.filter(|&k| k < unmasked[r]);
            let min_p_floor = opts.min_p.filter(|&mp| mp > 0.0 && !top_p).map(|mp| mp.ln() - 1e-9);
            if temp == 0.0 {
                list.extend(z.iter().position(|&x| x == gmax[r]));
            } else if let Some(k) = top_k {
                list = top_k_superset(z, k, m);
                if let Some(f) = min_p_floor {
                    list.retain(|&i| t(z[i]) >= f);
                }
            } else if let Some(f) = min_p_floor {
                // `t ≥ f` needs `z ≥ m + T·f`: the f32 at or below that bound gates the scan.
                let g = below_f32(m + temp * f);
                list.extend((0..z.len()).filter(|&i| z[i] >= g && z[i] != f32::NEG_INFINITY && t(z[i]) >= f));
            } else {
                // Top-p without top-k, or no filter: the renormalisation sums every token.
                list.extend((0..z.len()).filter(|&i| z[i] != f32::NEG_INFINITY));
            }
            list
        })
        .collect();
    let counts: Vec<i32> = lists.iter().map(|l| l.len() as i32).collect();
    let mut mine: Vec<f64> = Vec::with_capacity(2 * counts.iter().map(|&c| c as usize).sum::<usize>());
    for (r, list) in lists.iter().enumerate() {
        let z = row(r);
        for &i in list {
            mine.extend_from_slice(&[(vocab_start + i) as f64, z[i] as f64]);
        }
    }
    // Every rank's per-row counts, then the candidates themselves (variable sizes).
    let mut all_counts = vec![0i32; rows * p];
    comm.all_gather_into(&counts[..], &mut all_counts[..]);
    let per_rank: Vec<i32> = (0..p).map(|k| 2 * all_counts[k * rows..(k + 1) * rows].iter().sum::<i32>()).collect();
    let displs: Vec<i32> = per_rank.iter().scan(0, |a, &c| Some(std::mem::replace(a, *a + c))).collect();
    let mut cand = vec![0.0f64; per_rank.iter().map(|&c| c as usize).sum()];
    {
        let mut part = PartitionMut::new(&mut cand[..], &per_rank[..], &displs[..]);
        comm.all_gather_varcount_into(&mine[..], &mut part);
    }
    // Compact rows: row r's candidates from every rank in rank order (index ascending).
    let width = (0..rows).map(|r| (0..p).map(|k| all_counts[k * rows + r] as usize).sum::<usize>()).max().unwrap_or(0);
    let mut compact = vec![f32::NEG_INFINITY; rows * width.max(1)];
    let mut index = vec![0usize; rows * width.max(1)];
    let mut fill = vec![0usize; rows];
    for k in 0..p {
        let mut off = displs[k] as usize;
        for r in 0..rows {
            for _ in 0..all_counts[k * rows + r] {
                let j = r * width.max(1) + fill[r];
                index[j] = cand[off] as usize;
                compact[j] = cand[off + 1] as f32;
                fill[r] += 1;
                off += 2;
            }
        }
    }
    let stats =
        sample(View::rows(&compact, rows, width.max(1))?, draw, tokens, None::<(smax::ViewMut<'_, f32>, _)>, opts)?;
    for (r, tok) in tokens.iter_mut().enumerate() {
        *tok = index[r * width.max(1) + *tok as usize] as u32;
    }
    Ok(stats)
}

/// The largest f32 at or below `v`.
fn below_f32(v: f64) -> f32 {
    let f = v as f32;
    if f as f64 > v { f.next_down() } else { f }
}

/// The indices (ascending) of every unmasked `z_i ≥ z_k − δ`, with `z_k` the k-th largest
/// unmasked value of `z` (`k` < the unmasked count) and `δ = 2⁻⁴⁸·(|z_k| + |m|)`: a superset
/// of the tokens whose `t = (z − m)/T` is at least the k-th largest `t` (`t` is monotone in
/// `z`; two values can share a `t` only when they are within the f64 rounding of
/// `(z − m)/T`, far inside `δ`), hence of the slice's share of the global top k, ties and
/// strict order included. One pass over blocks of 64 values, looking inside a block only
/// when its maximum reaches the running threshold (the k-th largest value seen so far).
fn top_k_superset(z: &[f32], k: usize, m: f64) -> Vec<usize> {
    const BLOCK: usize = 64;
    let gate = |thr: f32| below_f32(thr as f64 - (thr.abs() as f64 + m.abs()) * f64::powi(2.0, -48));
    let mut buf: Vec<(f32, usize)> = Vec::with_capacity(2 * k + 2 * BLOCK);
    let (mut thr, mut g) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (b, blk) in z.chunks(BLOCK).enumerate() {
        // The block's max through the ordered integer image of the floats (vectorises).
        let bm = blk.iter().map(|&v| ordered(v)).max().unwrap_or(i32::MIN);
        if bm < ordered(g) {
            continue;
        }
        for (j, &v) in blk.iter().enumerate() {
            if v >= g && v != f32::NEG_INFINITY {
                buf.push((v, b * BLOCK + j));
            }
        }
        if buf.len() >= 2 * k + BLOCK {
            buf.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            thr = buf[k - 1].0;
            g = gate(thr);
            buf.retain(|e| e.0 >= g);
        }
    }
    if buf.len() > k {
        buf.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        thr = buf[k - 1].0;
        g = gate(thr);
    }
    let _ = thr;
    let mut out: Vec<usize> = buf.iter().filter(|e| e.0 >= g).map(|e| e.1).collect();
    out.sort_unstable();
    out
}

/// A total-order integer image of an f32 (NaN excluded, the two zeros one value): `a < b`
/// iff `ordered(a) < ordered(b)`.
#[inline]
fn ordered(v: f32) -> i32 {
    let b = (v + 0.0).to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

/// The inverse of [`ordered`].
#[inline]
fn unordered(o: i32) -> f32 {
    f32::from_bits((o ^ (((o >> 31) as u32) >> 1) as i32) as u32)
}
