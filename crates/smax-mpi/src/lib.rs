//! smax across processes over MPI (the `mpi` crate over the system's MPI): the softmax
//! family when the vocabulary or the context is sharded across ranks.
//!
//! | function | each rank holds | exchanged per call |
//! |---|---|---|
//! | [`vocab_parallel_cross_entropy`] | the logits of a vocabulary slice (any element type) | three f64 per row and rank |
//! | [`vocab_parallel_linear_cross_entropy`] | a slice of the classifier `W` (never the logits) | three f64 per row and rank, plus `∂loss/∂h` |
//! | [`ring_attention`], [`ring_attention_backward`] | a part of the sequence (its queries, keys and values): one contiguous chunk, or two for the load-balanced [`RingLayout::Zigzag`] | every key/value part passes each rank once (plus their gradients in the backward) |
//! | [`vocab_parallel_sample`] | the logits of a vocabulary slice | the candidates that can survive the filters |
//!
//! **Determinism.** Whatever crosses ranks is **all-gathered and merged in rank order** (or
//! passed around the ring in a fixed order), never reduced by the MPI library, so results are
//! bitwise independent of how the MPI library orders a reduction, and the same on every rank
//! where the result is shared (losses, log-sum-exps, sampled tokens).
//!
//! The two losses run the core's shard kernels ([`smax::loss::cross_entropy_sharded`],
//! [`smax::loss::linear_cross_entropy_sharded`]) with an MPI all-gather as their combiner;
//! attention and sampling call the core's single-process ops on each rank's part.
//!
//! **Errors.** Every call is collective and validates first in one agreement round: an error
//! on any rank (a shape, an option, a target) is returned on every rank, so no rank is left
//! waiting in a collective.

use mpi::traits::{Communicator, CommunicatorCollectives};
use smax::Error;

mod ce;
mod linear;
mod ring;
mod sample;

pub use ce::vocab_parallel_cross_entropy;
pub use linear::vocab_parallel_linear_cross_entropy;
pub use ring::{RingLayout, ring_attention, ring_attention_backward};
pub use sample::vocab_parallel_sample;

/// All-gathers `mine` (the same length on every rank) into `P` consecutive blocks, rank order.
pub(crate) fn gather<C: Communicator>(comm: &C, mine: &[f64]) -> Vec<f64> {
    let mut all = vec![0.0f64; mine.len() * comm.size() as usize];
    comm.all_gather_into(mine, &mut all[..]);
    all
}

pub(crate) fn bad(name: &'static str, value: impl std::fmt::Display, expected: &'static str) -> Error {
    Error::BadParameter { name, value: value.to_string(), expected }
}

/// One agreement round: every rank's `ok` flag and `meta` values (the same count on every
/// rank), gathered in rank order. Returns `[ok, meta...]` per rank.
pub(crate) fn agree<C: Communicator>(comm: &C, ok: bool, meta: &[f64]) -> Vec<Vec<f64>> {
    let mut mine = vec![ok as u8 as f64];
    mine.extend_from_slice(meta);
    let w = mine.len();
    gather(comm, &mine).chunks(w).map(|c| c.to_vec()).collect()
}

/// Checks an agreement round of a vocabulary-sharded call, `[ok, vocab_start, len, same...]`
/// per rank: every rank accepted its inputs (else `rejected`, the inputs each rank must
/// provide), the slices tile `[0, V)` in rank order, and the `same` values (named by
/// `same_name`) are equal on every rank. Returns `V`.
pub(crate) fn vocab_tiling(all: &[Vec<f64>], rejected: &'static str, same_name: &'static str) -> Result<usize, Error> {
    let mut v_total = 0usize;
    for (r, m) in all.iter().enumerate() {
        if m[0] != 1.0 {
            return Err(bad("inputs or options", format!("rejected on rank {r}"), rejected));
        }
        if m[1] as usize != v_total {
            return Err(bad(
                "vocab_start",
                format!("{} on rank {r}", m[1]),
                "the end of the previous rank's slice (slices tile [0, V) in rank order)",
            ));
        }
        if m[3..] != all[0][3..] {
            return Err(bad(same_name, format!("different on rank {r}"), "the same on every rank"));
        }
        v_total += m[2] as usize;
    }
    Ok(v_total)
}

/// `buf = Σ_ranks buf` in rank order (f64 sums, one rounding), the same bits on every rank:
/// all-gathers in chunks of at most 2^20 elements, so the memory is `P·2^20` f32 whatever the
/// buffer's size.
pub(crate) fn sum_in_rank_order<C: Communicator>(comm: &C, buf: &mut [f32]) {
    const CHUNK: usize = 1 << 20;
    let p = comm.size() as usize;
    let mut all = vec![0.0f32; CHUNK.min(buf.len()) * p];
    for c in buf.chunks_mut(CHUNK) {
        let all = &mut all[..c.len() * p];
        comm.all_gather_into(&c[..], &mut all[..]);
        let n = c.len();
        for (i, o) in c.iter_mut().enumerate() {
            *o = (0..p).map(|r| all[r * n + i] as f64).sum::<f64>() as f32;
        }
    }
}
