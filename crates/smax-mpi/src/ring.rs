//! Ring (context-parallel) attention: each rank holds a contiguous chunk of the sequence.

use crate::agree;
use mpi::point_to_point::send_receive_into;
use mpi::traits::{Communicator, Destination, Source};
use smax::Error;
use smax::attention::{
    AttentionGrads, AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, HeadStrides, Heads,
    PartialStates, QueryPositions, attention, attention_backward, merge_attention_states,
};

/// The sequence layout every rank agreed on: each rank's query and key chunk lengths, in
/// rank order, and the global query offset.
struct Ring {
    p: usize,
    rank: usize,
    q_start: usize,
    k_start: Vec<usize>,
    k_len: Vec<usize>,
    /// Key position of global query 0 under the caller's [`QueryPositions`].
    offset: i64,
}

impl Ring {
    /// The owner of the key/value chunk this rank holds at ring step `t`.
    fn owner(&self, t: usize) -> usize {
        (self.rank + self.p - t % self.p) % self.p
    }
    /// The options of the local call against chunk `o`: positions relative to that chunk.
    fn opts_for<'a>(&self, opts: &AttentionOptions<'a>, o: usize) -> AttentionOptions<'a> {
        let off = (self.q_start as i64).saturating_add(self.offset).saturating_sub(self.k_start[o] as i64);
        AttentionOptions { positions: QueryPositions::Offset(off), ..*opts }
    }
    fn shape(&self, s: &AttentionShape, o: usize) -> AttentionShape {
        AttentionShape { kv_len: self.k_len[o], ..*s }
    }
    /// Elements of one contiguous `[batch, kv_heads, len, d]` operand of chunk `o`.
    fn kv_elems(&self, s: &AttentionShape, o: usize) -> usize {
        self.shape(s, o).kv_len_elems()
    }
}

/// The first agreement round: shapes, options that cannot be sharded, and the sequence
/// layout. `local` is this rank's own verdict on its inputs.
fn setup<C: Communicator>(
    comm: &C,
    s: &AttentionShape,
    opts: &AttentionOptions<'_>,
    local: Result<(), Error>,
) -> Result<Ring, Error> {
    let p = comm.size() as usize;
    let rank = comm.rank() as usize;
    let local = local.and_then(|_| {
        if opts.bias.is_some() || opts.keep.is_some() {
            return Err(Error::Unsupported {
                what: "bias or keep mask",
                why: "ring attention takes masks by position (causal, window); a score-shaped mask is not sharded",
            });
        }
        Ok(())
    });
    let same = [s.batch, s.q_heads, s.kv_heads, s.head_dim];
    let mut meta = vec![s.q_len as f64, s.kv_len as f64];
    meta.extend(same.iter().map(|&x| x as f64));
    let all = agree(comm, local.is_ok(), &meta);
    local?;
    let mut k_start = Vec::with_capacity(p);
    let (mut q_total, mut k_total, mut q_start) = (0usize, 0usize, 0usize);
    let mut k_len = Vec::with_capacity(p);
    for (r, m) in all.iter().enumerate() {
        if m[0] != 1.0 {
            return Err(Error::BadParameter {
                name: "ring attention inputs",
                value: format!("rejected on rank {r}"),
                expected: "valid inputs and options on every rank",
            });
        }
        if m[3..] != all[0][3..] {
            return Err(Error::BadParameter {
                name: "batch, heads or head_dim",
                value: format!("different on rank {r}"),
                expected: "the same on every rank",
            });
        }
        if r == rank {
            q_start = q_total;
        }
        k_start.push(k_total);
        k_len.push(m[2] as usize);
        q_total += m[1] as usize;
        k_total += m[2] as usize;
    }
    let offset = match opts.positions {
        QueryPositions::BottomRight => k_total as i64 - q_total as i64,
        QueryPositions::Offset(o) => o,
    };
    Ok(Ring { p, rank, q_start, k_start, k_len, offset })
}

/// The second agreement round: every rank's verdict on its first local call.
fn confirm<C: Communicator>(comm: &C, local: Result<(), Error>) -> Result<(), Error> {
    let all = agree(comm, local.is_ok(), &[]);
    local?;
    match all.iter().position(|m| m[0] != 1.0) {
        Some(r) => Err(Error::BadParameter {
            name: "ring attention inputs",
            value: format!("rejected on rank {r}"),
            expected: "valid inputs and options on every rank",
        }),
        None => Ok(()),
    }
}

/// This rank's keys and values, contiguous `[batch, kv_heads, kv_len, d]` each, back to back
/// (what travels around the ring). The operands were validated by the first local call.
fn pack(s: &AttentionShape, k: Heads<'_, f32>, v: Heads<'_, f32>) -> Vec<f32> {
    let n = s.kv_len_elems();
    let mut out = Vec::with_capacity(2 * n);
    for x in [k, v] {
        let st = x.strides.unwrap_or(HeadStrides::bhsd(s.kv_heads, s.kv_len, s.head_dim));
        for b in 0..s.batch {
            for h in 0..s.kv_heads {
                for t in 0..s.kv_len {
                    let o = b * st.batch + h * st.head + t * st.token;
                    out.extend_from_slice(&x.data[o..o + s.head_dim]);
                }
            }
        }
    }
    out
}

/// Ring attention (Liu, Zaharia & Abbeel 2023; context parallelism), forward: the sequence is
/// cut into contiguous chunks in rank order, and each rank holds its chunk's queries, keys and
/// values (`inputs`, its local `AttentionShape`: `q_len`, `kv_len` this rank's chunk lengths,
/// the other sizes the same on every rank). The key/value chunks travel once around the ring;
/// while a chunk is in flight to the next rank (non-blocking send and receive) this rank runs
/// smax's flash attention of its queries against the chunk it holds, and merges the partial
/// output with [`merge_attention_states`] (the log-sum-exp merge, in ring order).
///
/// Writes this rank's rows of the attention over the **whole** sequence into
/// `outputs.out` (contiguous `[batch, q_heads, q_len, d]`) and, when given, their global
/// log-sum-exp into `outputs.lse` (what [`ring_attention_backward`] takes). Masks are by global
/// position: `causal`, `window` and `positions` mean what they mean for [`attention`] on the
/// gathered sequence (`BottomRight` aligns the last global query with the last global key);
/// chunks a query block cannot see cost no products. A score bias or keep mask is not
/// supported (it is score-shaped, not sharded). f32 only.
///
/// Equal to [`attention`] on the gathered sequence within its bound plus one f32 rounding per
/// merge (`P − 1` merges): tested at `|o − o_ref| ≤ 1e-5·(1 + max|v|)` under `mpirun -n 1, 2, 4`.
/// Memory: two key/value chunks in flight and one partial output.
///
/// Collective: every rank calls it. Errors (on every rank after an agreement round): those of
/// [`attention`] on any rank, a bias or mask, and batch, heads or head dimension that differ
/// across ranks.
pub fn ring_attention<C: Communicator>(
    comm: &C,
    inputs: AttentionInputs<'_, f32>,
    outputs: AttentionOutputs<'_, f32>,
    opts: &AttentionOptions<'_>,
) -> Result<(), Error> {
    let s = inputs.shape;
    let local = Ok(());
    let ring = setup(comm, &s, opts, local)?;
    let AttentionOutputs { out, lse } = outputs;
    let rows = s.lse_len();
    let mut own_lse = vec![0.0f32; if lse.is_some() { 0 } else { rows }];
    let lse: &mut [f32] = lse.unwrap_or(&mut own_lse);
    // Step 0: this rank's own chunk, straight from the caller's buffers (validates them).
    let first = attention(inputs, AttentionOutputs::new(out, Some(lse)), &ring.opts_for(opts, ring.rank));
    confirm(comm, first)?;
    if ring.p == 1 {
        return Ok(());
    }
    let d = s.head_dim;
    let mut held = pack(&s, inputs.k, inputs.v);
    let mut incoming = Vec::new();
    let mut parts = vec![0.0f32; 2 * rows * d];
    let mut part_lse = vec![0.0f32; 2 * rows];
    let next = comm.process_at_rank(((ring.rank + 1) % ring.p) as i32);
    let prev = comm.process_at_rank(((ring.rank + ring.p - 1) % ring.p) as i32);
    let mut result = Ok(());
    for t in 0..ring.p {
        let o = ring.owner(t);
        let last = t + 1 == ring.p;
        // Chunk `o` (held since the last step) is forwarded while the one after it arrives.
        incoming.resize(if last { 0 } else { 2 * ring.kv_elems(&s, ring.owner(t + 1)) }, 0.0);
        mpi::request::scope(|sc| {
            let sent = (!last).then(|| next.immediate_send(sc, &held[..]));
            let recv = (!last).then(|| prev.immediate_receive_into(sc, &mut incoming[..]));
            if t > 0 && result.is_ok() {
                result = step(&s, &ring, inputs.q, &held, o, opts, out, lse, &mut parts, &mut part_lse);
            }
            if let Some(r) = recv {
                r.wait();
            }
            if let Some(r) = sent {
                r.wait();
            }
        });
        std::mem::swap(&mut held, &mut incoming);
    }
    result
}

/// One ring step of the forward: this rank's queries against chunk `o` (`held`), merged into
/// the running `(out, lse)`.
#[allow(clippy::too_many_arguments)]
fn step(
    s: &AttentionShape,
    ring: &Ring,
    q: Heads<'_, f32>,
    held: &[f32],
    o: usize,
    opts: &AttentionOptions<'_>,
    out: &mut [f32],
    lse: &mut [f32],
    parts: &mut [f32],
    part_lse: &mut [f32],
) -> Result<(), Error> {
    let (rows, n) = (s.lse_len(), s.out_len());
    let half = held.len() / 2;
    let (k, v) = held.split_at(half);
    let (run_o, new_o) = parts.split_at_mut(n);
    let (run_l, new_l) = part_lse.split_at_mut(rows);
    attention(
        AttentionInputs::new(ring.shape(s, o), q, Heads::new(k), Heads::new(v)),
        AttentionOutputs::new(new_o, Some(new_l)),
        &ring.opts_for(opts, o),
    )?;
    run_o.copy_from_slice(out);
    run_l.copy_from_slice(lse);
    merge_attention_states(PartialStates { parts: 2, rows, head_dim: s.head_dim, out: parts, lse: part_lse }, out, lse)
}

/// Ring attention, backward: from this rank's inputs (as given to [`ring_attention`]), its
/// rows of the forward output `out`, their global log-sum-exp `lse` and the upstream gradient
/// `d_out`, writes this rank's `dq` and the gradients `dk`, `dv` of **its own** key/value
/// chunk (contiguous, as [`attention_backward`]'s).
///
/// The key/value chunks travel around the ring with their gradient accumulators: at each step
/// this rank runs smax's flash backward of its queries against the chunk it holds (the exact
/// gradient terms of those (query, key) pairs, since `out` and `lse` are the global ones),
/// adds the chunk's `dk`, `dv` terms to its accumulators and passes chunk and accumulators on;
/// after `P` steps every accumulator is home. The next chunk's keys and values are received
/// (non-blocking) while the local backward runs; the accumulators move after it.
///
/// Equal to [`attention_backward`] on the gathered sequence within its bound, summed over
/// chunks in f32 (`dq` over the `P` chunks in ring order, `dk`, `dv` over the ranks in ring
/// order): tested within `2e-5` of the largest gradient under `mpirun -n 1, 2, 4`. A score-bias
/// gradient is not supported. Collective, with the errors of [`ring_attention`] and
/// [`attention_backward`].
#[allow(clippy::too_many_arguments)]
pub fn ring_attention_backward<C: Communicator>(
    comm: &C,
    inputs: AttentionInputs<'_, f32>,
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    grads: AttentionGrads<'_, f32>,
    opts: &AttentionOptions<'_>,
) -> Result<(), Error> {
    let s = inputs.shape;
    let local = match grads.d_bias {
        Some(_) => Err(Error::Unsupported { what: "d_bias", why: "ring attention takes no score bias" }),
        None => Ok(()),
    };
    let ring = setup(comm, &s, opts, local)?;
    let AttentionGrads { dq, dk, dv, .. } = grads;
    let (n, nk) = (s.out_len(), s.kv_len_elems());
    // Step 0 into the caller's buffers: this rank's queries against its own chunk.
    let first = attention_backward(
        inputs,
        out,
        lse,
        d_out,
        AttentionGrads::new(&mut *dq, &mut *dk, &mut *dv),
        &ring.opts_for(opts, ring.rank),
    );
    confirm(comm, first)?;
    if ring.p == 1 {
        return Ok(());
    }
    let mut held = pack(&s, inputs.k, inputs.v);
    let mut incoming = Vec::new();
    // The accumulators of the chunk held: [dk | dv].
    let mut acc: Vec<f32> = dk.iter().chain(dv.iter()).copied().collect();
    let mut acc_in = Vec::new();
    let (mut dq_t, mut dk_t, mut dv_t) = (vec![0.0f32; n], Vec::new(), Vec::new());
    let next = comm.process_at_rank(((ring.rank + 1) % ring.p) as i32);
    let prev = comm.process_at_rank(((ring.rank + ring.p - 1) % ring.p) as i32);
    let mut result = Ok(());
    for t in 0..ring.p {
        let o = ring.owner(t);
        let last = t + 1 == ring.p;
        incoming.resize(if last { 0 } else { 2 * ring.kv_elems(&s, ring.owner(t + 1)) }, 0.0);
        mpi::request::scope(|sc| {
            let sent = (!last).then(|| next.immediate_send(sc, &held[..]));
            let recv = (!last).then(|| prev.immediate_receive_into(sc, &mut incoming[..]));
            if t > 0 && result.is_ok() {
                let e = ring.kv_elems(&s, o);
                dk_t.resize(e, 0.0);
                dv_t.resize(e, 0.0);
                let (k, v) = held.split_at(held.len() / 2);
                result = attention_backward(
                    AttentionInputs::new(ring.shape(&s, o), inputs.q, Heads::new(k), Heads::new(v)),
                    out,
                    lse,
                    d_out,
                    AttentionGrads::new(&mut dq_t, &mut dk_t, &mut dv_t),
                    &ring.opts_for(opts, o),
                );
                for (a, &x) in dq.iter_mut().zip(&dq_t) {
                    *a += x;
                }
                for (a, &x) in acc.iter_mut().zip(dk_t.iter().chain(&dv_t)) {
                    *a += x;
                }
            }
            if let Some(r) = recv {
                r.wait();
            }
            if let Some(r) = sent {
                r.wait();
            }
        });
        std::mem::swap(&mut held, &mut incoming);
        // The accumulators follow their chunk; after the last step they reach its owner.
        acc_in.resize(2 * ring.kv_elems(&s, ring.owner(t + 1)), 0.0);
        send_receive_into(&acc[..], &next, &mut acc_in[..], &prev);
        std::mem::swap(&mut acc, &mut acc_in);
    }
    result?;
    dk.copy_from_slice(&acc[..nk]);
    dv.copy_from_slice(&acc[nk..]);
    Ok(())
}
