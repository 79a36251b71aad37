//! Vocabulary-parallel cross-entropy over given logits.

use crate::{agree, bad, gather, vocab_tiling};
use mpi::traits::Communicator;
use smax::loss::{CrossEntropyOptions, LossReport, RowOutputs, ShardRow, Targets, VocabShard, cross_entropy_sharded};
use smax::{Element, Error, View, ViewMut};

/// Vocabulary-parallel cross-entropy (Megatron-LM's `vocab_parallel_cross_entropy`, exact):
/// this rank's `logits` are the columns `vocab_start .. vocab_start + cols` of the `rows x V`
/// logits (f32, f64, f16 or bf16); the ranks' slices must tile `[0, V)` in rank order
/// (checked collectively). `targets` (global class indices or `opts.ignore_index`) and `opts`
/// are the same on every rank; `opts.class_weights`, when given, is the full length-`V`
/// vector on every rank.
///
/// Each rank runs [`smax::loss::cross_entropy_sharded`] on its slice: per block of rows (about
/// 8 MiB of whole-vocabulary logits; the same blocks on every rank), the SIMD row kernel's
/// statistics of the slice (log-sum-exp, target logit, smoothing sum), **one all-gather of
/// three f64 per row and rank**, merged by [`ShardRow::merge`] in rank order (so the global
/// statistics are the same bits on every rank, whatever order MPI would reduce in), then the
/// gradient of the slice from the global log-sum-exp while the block is in cache. No logit
/// crosses ranks.
///
/// The loss is PyTorch's, `w_y(1 − ε)(lse − z_y) + (ε/V)·Σ_k w_k(lse − z_k)` plus the z-loss
/// `λ·lse²`, with the same reductions (the mean divides by `Σ w_y` over non-ignored rows, the
/// z-loss by their count), the temperature and soft cap applied as in
/// [`smax::loss::cross_entropy`]; the gradient of this rank's slice goes to `grad` (the slice's
/// shape); `rows_out` takes the per-row loss, z-loss and lse (global, identical on every rank).
/// Results equal single-process `cross_entropy` on the gathered logits within its bound
/// (tested under `mpirun -n 1, 2, 4`: losses to 2e-6 relative, gradients to 2e-6 of the
/// largest, masked and all-masked rows included), and are identical on every rank.
///
/// Collective: every rank must call it with the same `targets`, options and element type.
/// Errors (returned on every rank, after one agreement round, so no rank is left waiting):
/// slices that do not tile `[0, V)`, different row counts or targets, targets out of `[0, V)`
/// that are not the ignore index, class weights not of length `V`, options out of range, the
/// shape errors of the views, an error on any rank before the first exchange.
pub fn vocab_parallel_cross_entropy<C: Communicator, T: Element>(
    comm: &C,
    logits: View<'_, T>,
    vocab_start: usize,
    targets: &[i64],
    grad: Option<ViewMut<'_, T>>,
    rows_out: RowOutputs<'_>,
    opts: &CrossEntropyOptions<'_>,
) -> Result<LossReport, Error> {
    let lay = logits.layout();
    let (rows, cols) = (lay.row_count(), lay.row_len());
    // Local checks: the options as `cross_entropy` validates them (on an empty batch), the
    // lengths of the targets and of every output, the layouts.
    let opts_ok = smax::loss::cross_entropy(
        View::rows(&[0.0f32; 0], 0, 1)?,
        Targets::Classes(&[]),
        None,
        RowOutputs::default(),
        &opts.without_class_weights(),
    )
    .is_ok();
    let grad_ok = grad.as_ref().is_none_or(|g| {
        let gl = g.layout();
        gl.row_count() == rows && gl.row_len() == cols && gl.row_stride().is_some()
    });
    let outs_ok =
        [&rows_out.loss, &rows_out.z_loss, &rows_out.lse].iter().all(|o| o.as_deref().is_none_or(|o| o.len() == rows));
    let local_ok = opts_ok && grad_ok && outs_ok && targets.len() == rows && lay.row_stride().is_some();
    let digest = targets.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| (h ^ t as u64).wrapping_mul(0x0100_0000_01b3));
    let meta = [
        vocab_start as f64,
        cols as f64,
        rows as f64,
        core::mem::size_of::<T>() as f64,
        (digest >> 32) as f64,
        (digest & 0xffff_ffff) as f64,
    ];
    let all = agree(comm, local_ok, &meta);
    let v_total = vocab_tiling(
        &all,
        "the options cross_entropy accepts, targets and row outputs of one per row, row layouts, a gradient of the slice's shape",
        "rows, element type or targets",
    )?;
    // The combiner: per block, one all-gather of [ok, (lse, target logit, logit sum) per row].
    // A rank that fails before its first exchange still joins it, with ok = 0, so every rank
    // returns.
    let mut reached = false;
    let mut combine = |rows: &mut [ShardRow]| -> Result<(), Error> {
        reached = true;
        exchange(comm, rows, true)
    };
    let res = cross_entropy_sharded(
        logits,
        Targets::Classes(targets),
        grad,
        rows_out,
        VocabShard { start: vocab_start, total: v_total, combine: &mut combine },
        opts,
    );
    if res.is_err() && !reached && rows > 0 {
        let block = ((8usize << 20) / (core::mem::size_of::<T>() * v_total.max(1))).clamp(1, rows);
        let mut dummy = vec![ShardRow { lse: 0.0, target_logit: 0.0, logit_sum: 0.0 }; block];
        let _ = exchange(comm, &mut dummy, false);
    }
    res
}

/// One exchange: every rank's `rows` all-gathered with its `ok` flag and merged in rank order.
pub(crate) fn exchange<C: Communicator>(comm: &C, rows: &mut [ShardRow], ok: bool) -> Result<(), Error> {
    let n = rows.len();
    let mut mine = Vec::with_capacity(1 + 3 * n);
    mine.push(ok as u8 as f64);
    for r in rows.iter() {
        mine.extend_from_slice(&[r.lse, r.target_logit, r.logit_sum]);
    }
    let all = gather(comm, &mine);
    let w = 1 + 3 * n;
    let p = all.len() / w;
    if (0..p).any(|k| all[k * w] != 1.0) {
        return Err(bad("peer", "a rank failed before the exchange", "every rank to reach it"));
    }
    for (i, out) in rows.iter_mut().enumerate() {
        let part = |k: usize| {
            let b = k * w + 1 + 3 * i;
            ShardRow { lse: all[b], target_logit: all[b + 1], logit_sum: all[b + 2] }
        };
        *out = ShardRow::merge((0..p).map(part));
    }
    Ok(())
}
