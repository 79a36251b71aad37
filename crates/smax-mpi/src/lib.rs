//! smax across processes over MPI (the `mpi` crate over the system's MPI).
//!
//! [`vocab_parallel_cross_entropy`]: Megatron-style vocabulary-parallel cross-entropy. Each rank
//! holds the logits of a contiguous slice of the vocabulary for every row; the ranks exchange
//! per-row scalars only (local log-sum-exp, target logit, weighted logit sums: a few f64 per
//! row and rank), never logits, and every rank gets the loss and the gradient of its own
//! slice. The per-rank states are **all-gathered and merged in rank order**, so the result is
//! bitwise independent of how the MPI library orders a reduction, and the same on every rank.
//!
//! The library's other cross-process pieces (the linear cross-entropy with a sharded
//! classifier, ring attention, sharded sampling) are not built yet.

use mpi::traits::{Communicator, CommunicatorCollectives};
use smax::loss::{AllIgnored, CrossEntropyOptions, LossReport, Reduction, RowOutputs};
use smax::{Error, Options, View, ViewMut};

/// All-gathers `mine` (the same length on every rank) into `P` consecutive blocks, rank order.
fn gather<C: Communicator>(comm: &C, mine: &[f64]) -> Vec<f64> {
    let mut all = vec![0.0f64; mine.len() * comm.size() as usize];
    comm.all_gather_into(mine, &mut all[..]);
    all
}

fn bad(name: &'static str, value: impl std::fmt::Display, expected: &'static str) -> Error {
    Error::BadParameter { name, value: value.to_string(), expected }
}

/// Vocabulary-parallel cross-entropy (Megatron-LM's `vocab_parallel_cross_entropy`, exact):
/// this rank's `logits` are the columns `vocab_start .. vocab_start + cols` of the `rows x V`
/// logits; the ranks' slices must tile `[0, V)` in rank order (checked collectively).
/// `targets` (global class indices or `opts.ignore_index`) and `opts` are the same on every
/// rank; `opts.class_weights`, when given, is the full length-`V` vector on every rank.
///
/// Per row, in f64 after smax's f32 `logsumexp` of the local slice (temperature and soft cap
/// applied as in [`smax::loss::cross_entropy`]): the global `lse` merges the ranks' local
/// values in rank order; the loss is PyTorch's,
/// `w_y(1 − ε)(lse − z_y) + (ε/V)·Σ_k w_k(lse − z_k)` plus the z-loss `λ·lse²`, with the same
/// reductions (the mean divides by `Σ w_y` over non-ignored rows, the z-loss by their count);
/// the gradient of this rank's slice goes to `grad` (the slice's shape). `rows_out` takes the
/// per-row loss, z-loss and lse (global, identical on every rank).
///
/// Results equal single-process [`smax::loss::cross_entropy`] on the gathered logits within
/// its bound (tested under `mpirun -n 2` and `-n 4`), and are identical on every rank.
///
/// Collective: every rank must call it with the same `targets` and options. Errors (returned
/// on every rank, after one agreement round, so no rank is left waiting): slices that do not
/// tile `[0, V)`, different row counts, targets out of `[0, V)` that are not the ignore index,
/// class weights not of length `V`, options out of range, and the shape errors of the views.
#[allow(clippy::too_many_arguments)]
pub fn vocab_parallel_cross_entropy<C: Communicator>(
    comm: &C,
    logits: View<'_, f32>,
    vocab_start: usize,
    targets: &[i64],
    grad: Option<ViewMut<'_, f32>>,
    rows_out: RowOutputs<'_>,
    opts: &CrossEntropyOptions<'_>,
) -> Result<LossReport, Error> {
    let lay = logits.layout();
    let (rows, cols) = (lay.row_count(), lay.row_len());
    let stride = lay
        .row_stride()
        .ok_or(Error::Unsupported { what: "logits", why: "vocab-parallel cross-entropy takes row layouts" })?;
    // Round 1: every rank's (ok, vocab_start, cols, rows); all agree before any data moves.
    let local_ok = targets.len() == rows
        && opts.temperature.is_finite()
        && opts.temperature > 0.0
        && (0.0..=1.0).contains(&opts.label_smoothing)
        && opts.z_loss.is_finite()
        && opts.z_loss >= 0.0
        && opts.softcap.is_none_or(|c| c.is_finite() && c > 0.0);
    let meta = gather(comm, &[local_ok as u8 as f64, vocab_start as f64, cols as f64, rows as f64]);
    let p = comm.size() as usize;
    let mut v_total = 0usize;
    for r in 0..p {
        let m = &meta[r * 4..r * 4 + 4];
        if m[0] != 1.0 {
            return Err(bad(
                "options or targets",
                format!("rejected on rank {r}"),
                "valid on every rank (targets.len() = rows, temperature > 0, smoothing in [0, 1], z_loss >= 0, softcap > 0)",
            ));
        }
        if m[1] as usize != v_total {
            return Err(bad(
                "vocab_start",
                format!("{} on rank {r}", m[1]),
                "the end of the previous rank's slice (slices tile [0, V) in rank order)",
            ));
        }
        if m[3] as usize != rows {
            return Err(Error::LengthMismatch { what: "rows on another rank", len: m[3] as usize, expected: rows });
        }
        v_total += m[2] as usize;
    }
    if let Some((row, &target)) = targets
        .iter()
        .enumerate()
        .find(|(_, t)| **t != opts.ignore_index && !usize::try_from(**t).is_ok_and(|t| t < v_total))
    {
        return Err(Error::TargetOutOfRange { row, target, classes: v_total });
    }
    if let Some(w) = opts.class_weights {
        if w.len() != v_total {
            return Err(Error::LengthMismatch { what: "class_weights", len: w.len(), expected: v_total });
        }
        if let Some(x) = w.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
            return Err(bad("class weight", x, "finite and >= 0"));
        }
    }
    let tau = opts.temperature;
    let cap = opts.softcap;
    let eps = opts.label_smoothing;
    let weight = |k: usize| opts.class_weights.map_or(1.0, |w| w[k] as f64);
    // Local scaled logits s = cap(x)/τ in f64 as each row is used; the local lse in f32 SIMD.
    let scaled = |x: f32| -> f64 {
        let x = x as f64;
        match cap {
            Some(c) => c * (x / c).tanh() / tau,
            None => x / tau,
        }
    };
    let capped: Vec<f32>;
    let lse_src: View<'_, f32> = match cap {
        None => logits,
        Some(_) => {
            capped = (0..rows)
                .flat_map(|r| {
                    logits_row(&logits, r, stride, cols).iter().map(|&x| (scaled(x) * tau) as f32).collect::<Vec<f32>>()
                })
                .collect();
            View::rows(&capped, rows, cols)?
        }
    };
    let local_lse: Vec<f64> = if cols == 0 {
        vec![f64::NEG_INFINITY; rows]
    } else {
        smax::logsumexp_to_vec(lse_src, &Options { temperature: tau, ..Default::default() })?
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    // Per row: local lse, the target's scaled logit (0 off this slice), Σ_k w_k s_k on the slice.
    let mut mine = vec![0.0f64; rows * 3];
    for r in 0..rows {
        let row = logits_row(&logits, r, stride, cols);
        mine[r * 3] = local_lse[r];
        let y = targets[r];
        if y != opts.ignore_index {
            let y = y as usize;
            if (vocab_start..vocab_start + cols).contains(&y) {
                mine[r * 3 + 1] = scaled(row[y - vocab_start]);
            }
            if eps > 0.0 {
                mine[r * 3 + 2] = row.iter().enumerate().map(|(j, &x)| weight(vocab_start + j) * scaled(x)).sum();
            }
        }
    }
    let all = gather(comm, &mine);
    let at = |rank: usize, r: usize, f: usize| all[rank * rows * 3 + r * 3 + f];
    let w_sum: f64 = (0..v_total).map(weight).sum();
    let lam = opts.z_loss;
    let mut lse = vec![f64::NEG_INFINITY; rows];
    let (mut loss_rows, mut z_rows) = (vec![0.0f64; rows], vec![0.0f64; rows]);
    let (mut denom, mut valid) = (0.0f64, 0usize);
    for r in 0..rows {
        let m = (0..p).map(|k| at(k, r, 0)).fold(f64::NEG_INFINITY, f64::max);
        lse[r] = if m == f64::NEG_INFINITY || m.is_nan() {
            m
        } else {
            m + (0..p).map(|k| (at(k, r, 0) - m).exp()).sum::<f64>().ln()
        };
        let y = targets[r];
        if y == opts.ignore_index {
            continue;
        }
        let (zy, sz): (f64, f64) = ((0..p).map(|k| at(k, r, 1)).sum(), (0..p).map(|k| at(k, r, 2)).sum());
        let wy = weight(y as usize);
        let mut l = wy * (1.0 - eps) * (lse[r] - zy);
        if eps > 0.0 {
            l += eps / v_total as f64 * (w_sum * lse[r] - sz);
        }
        loss_rows[r] = l;
        z_rows[r] = lam * lse[r] * lse[r];
        denom += wy;
        valid += 1;
    }
    let (scale, z_scale, denominator) = match opts.reduction {
        Reduction::Mean => (1.0 / denom, 1.0 / valid as f64, denom),
        Reduction::Sum | Reduction::None => (1.0, 1.0, 1.0),
    };
    let empty_mean = opts.reduction == Reduction::Mean && valid == 0;
    let reduce = |v: &[f64], s: f64| -> f64 {
        if empty_mean {
            return match opts.all_ignored {
                AllIgnored::Nan => f64::NAN,
                _ => 0.0,
            };
        }
        v.iter().sum::<f64>() * s
    };
    let report = LossReport {
        loss: reduce(&loss_rows, scale),
        z_loss: reduce(&z_rows, z_scale),
        valid_rows: valid,
        denominator,
        flagged_rows: 0,
    };
    if let Some(g) = grad {
        let gl = g.layout();
        if (gl.row_count(), gl.row_len()) != (rows, cols) {
            return Err(Error::ShapeMismatch {
                what: "grad",
                got: format!("{} x {}", gl.row_count(), gl.row_len()),
                expected: format!("{rows} x {cols}"),
            });
        }
        let gs = gl
            .row_stride()
            .ok_or(Error::Unsupported { what: "grad", why: "vocab-parallel cross-entropy takes row layouts" })?;
        let data = g.into_data();
        // The local softmax by smax's kernel (f32 SIMD) straight into the gradient, rescaled
        // per row below by exp(lse_local − lse): the global probabilities of this slice.
        if cols > 0 && rows > 0 {
            smax::softmax(
                lse_src,
                ViewMut::new(&mut *data, gl)?,
                &Options { temperature: tau, masked_row: smax::MaskedRow::Zero, ..Default::default() },
            )?;
        }
        let up = opts.grad_scale;
        let step = eps / v_total as f64 * scale * up;
        for r in 0..rows {
            let out = &mut data[r * gs..r * gs + cols];
            let y = targets[r];
            if y == opts.ignore_index || empty_mean {
                out.fill(0.0);
                continue;
            }
            let y = y as usize;
            let wy = weight(y);
            let a = (wy * (1.0 - eps) + eps / v_total as f64 * w_sum) * scale * up + 2.0 * lam * lse[r] * z_scale * up;
            let c = (a * (local_lse[r] - lse[r]).exp()) as f32;
            match (opts.class_weights, eps > 0.0) {
                (Some(w), true) => {
                    for (o, &wk) in out.iter_mut().zip(&w[vocab_start..vocab_start + cols]) {
                        *o = c * *o - (step * wk as f64) as f32;
                    }
                }
                (None, true) => {
                    let st = step as f32;
                    out.iter_mut().for_each(|o| *o = c * *o - st);
                }
                (_, false) => out.iter_mut().for_each(|o| *o *= c),
            }
            if (vocab_start..vocab_start + cols).contains(&y) {
                out[y - vocab_start] -= (wy * (1.0 - eps) * scale * up) as f32;
            }
            let row = logits_row(&logits, r, stride, cols);
            if let Some(cv) = cap {
                // The cap's chain factor, 1 − (capped/c)², and the temperature.
                for (o, &x) in out.iter_mut().zip(row) {
                    let t = (x as f64 / cv).tanh();
                    *o = (*o as f64 * (1.0 - t * t) / tau) as f32;
                }
            } else if tau != 1.0 {
                let it = (1.0 / tau) as f32;
                out.iter_mut().for_each(|o| *o *= it);
            }
        }
    }
    let RowOutputs { loss, z_loss, lse: lse_out, .. } = rows_out;
    for (dst, src) in [(loss, &loss_rows), (z_loss, &z_rows), (lse_out, &lse)] {
        if let Some(d) = dst {
            if d.len() != rows {
                return Err(Error::RowCountMismatch { what: "row outputs", len: d.len(), rows });
            }
            d.copy_from_slice(src);
        }
    }
    Ok(report)
}

fn logits_row<'a>(v: &View<'a, f32>, r: usize, stride: usize, cols: usize) -> &'a [f32] {
    &v.data()[r * stride..r * stride + cols]
}
