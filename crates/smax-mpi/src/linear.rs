//! Vocabulary-parallel linear cross-entropy: each rank holds a slice of the classifier.

use crate::{agree, sum_in_rank_order, vocab_tiling};
use mpi::traits::Communicator;
use smax::Error;
use smax::loss::{
    LinearCeScratch, LinearCrossEntropyOptions, LinearGrads, LinearInputs, LinearShape, LossReport, RowOutputs,
    ShardRow, VocabShard, linear_cross_entropy, linear_cross_entropy_sharded,
};

/// Vocabulary-parallel linear cross-entropy (Megatron-LM's vocabulary-parallel output layer
/// fused with Cut Cross-Entropy): this rank's `inputs.w` (`shape.v x d`) and `inputs.bias` are the
/// classes `vocab_start .. vocab_start + shape.v` of the `V x d` classifier, the ranks' slices
/// tiling `[0, V)` in rank order; `inputs.h` (`n x d`), the targets (global class indices) and
/// `opts` are the same on every rank. No rank ever holds an `n x V` (or `n x shape.v`) logit
/// matrix: each runs [`smax::loss::linear_cross_entropy_sharded`] over its slice, tile by tile.
///
/// Communication: one all-gather of three f64 per token and rank (each rank's log-sum-exp,
/// target logit and logit sum over its slice, merged by [`ShardRow::merge`] in rank order:
/// the same global statistics, bit for bit, on every rank), then, when `grads.dh` is given,
/// the sum of the ranks' `dh` terms in rank order (chunked all-gathers of `n·d` f32).
///
/// Outputs: the loss, [`LossReport`] and row outputs of the whole vocabulary (identical on
/// every rank); `grads.dw`, `grads.dbias` of this rank's slice; `grads.dh` the full
/// `∂loss/∂h` (identical on every rank). Equal to [`linear_cross_entropy`] on the gathered
/// classifier within its bound (the shards' f64 log-sum-exp merge adds a few f64 ULP; `dh`
/// is summed over ranks in f64 and rounded once), for every option: reduction,
/// `ignore_index`, label smoothing, z-loss, soft cap, gradient scale and filter.
///
/// Collective: every rank calls it with the same `h`, targets and options, and asks for the
/// same gradients. Errors, on every rank after one agreement round: slices that do not tile
/// `[0, V)`, different `n` or `d` or targets across ranks, buffer lengths, options, targets
/// out of `[0, V)`, and an allocation failure on any rank.
#[allow(clippy::too_many_arguments)]
pub fn vocab_parallel_linear_cross_entropy<C: Communicator>(
    comm: &C,
    shape: LinearShape,
    inputs: LinearInputs<'_>,
    vocab_start: usize,
    grads: LinearGrads<'_>,
    rows_out: RowOutputs<'_>,
    scratch: Option<&mut LinearCeScratch>,
    opts: &LinearCrossEntropyOptions,
) -> Result<LossReport, Error> {
    let LinearShape { n, d, v } = shape;
    // Local checks that do not need the other ranks: lengths, and the options (validated by a
    // call on an empty batch).
    let nd = n.checked_mul(d);
    let vd = v.checked_mul(d);
    let lens_ok = nd == Some(inputs.h.len())
        && vd == Some(inputs.w.len())
        && inputs.bias.is_none_or(|b| b.len() == v)
        && inputs.targets.len() == n
        && grads.dh.as_deref().is_none_or(|g| Some(g.len()) == nd)
        && grads.dw.as_deref().is_none_or(|g| Some(g.len()) == vd)
        && grads.dbias.as_deref().is_none_or(|g| g.len() == v)
        && [&rows_out.loss, &rows_out.z_loss, &rows_out.lse].iter().all(|r| r.as_deref().is_none_or(|r| r.len() == n));
    let opts_ok = linear_cross_entropy(
        LinearShape { n: 0, d: 1, v: 1 },
        LinearInputs { h: &[], w: &[0.0], bias: None, targets: &[] },
        LinearGrads::default(),
        RowOutputs::default(),
        None,
        opts,
    )
    .is_ok();
    let digest =
        inputs.targets.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| (h ^ t as u64).wrapping_mul(0x0100_0000_01b3));
    let meta = [
        vocab_start as f64,
        v as f64,
        n as f64,
        d as f64,
        grads.dh.is_some() as u8 as f64,
        (digest >> 32) as f64,
        (digest & 0xffff_ffff) as f64,
    ];
    let all = agree(comm, lens_ok && opts_ok && d > 0, &meta);
    let total = vocab_tiling(
        &all,
        "buffer lengths that match the shape, d >= 1 and valid options on every rank",
        "n, d, targets or the gradients asked for",
    )?;
    // The combiner: one all-gather of [ok, (lse, target logit, logit sum) per token]. A rank
    // that fails before reaching it still takes part, with ok = 0, so every rank returns.
    let mut reached = false;
    let mut combine = |rows: &mut [ShardRow]| -> Result<(), Error> {
        reached = true;
        crate::ce::exchange(comm, rows, true)
    };
    let LinearGrads { mut dh, dw, dbias } = grads;
    let res = linear_cross_entropy_sharded(
        shape,
        inputs,
        LinearGrads { dh: dh.as_deref_mut(), dw, dbias },
        rows_out,
        scratch,
        VocabShard { start: vocab_start, total, combine: &mut combine },
        opts,
    );
    if !reached {
        // This rank failed before the exchange: join it with ok = 0.
        let mut dummy = vec![ShardRow { lse: 0.0, target_logit: 0.0, logit_sum: 0.0 }; n];
        let _ = crate::ce::exchange(comm, &mut dummy, false);
    }
    let report = res?;
    // Every rank asked for `dh` or none did (agreed above).
    if let Some(g) = dh {
        sum_in_rank_order(comm, g);
    }
    Ok(report)
}
