//! Ring (context-parallel) attention: each rank holds a part of the sequence, one contiguous
//! chunk or (zigzag) two.

use crate::agree;
use mpi::point_to_point::send_receive_into;
use mpi::traits::{Communicator, Destination, Source};
use smax::Error;
use smax::attention::{
    AttentionGrads, AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, HeadStrides, Heads,
    PartialStates, QueryPositions, attention, attention_backward, merge_attention_states,
};

/// How the sequence is cut among the ranks (the `variant` of ring attention's
/// [`AttentionOptions`]). Queries and keys are cut the same way, each by its own length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RingLayout {
    /// Rank `r` holds one contiguous chunk, chunks in rank order (any lengths). Under
    /// `causal`, rank `r` computes `2r + 1` of the `P²` block pairs' triangles: the later
    /// ranks do most of the work.
    #[default]
    Contiguous,
    /// The sequence (of `S` tokens) is cut into `2P` chunks as evenly as possible (the first
    /// `S mod 2P` one token longer); rank `r` holds chunks `r` and `2P − 1 − r`, back to back
    /// in that order. Under `causal` every rank then does the same work (the load-balanced
    /// layout of Megatron-LM's context parallelism).
    Zigzag,
}

/// One contiguous run of a rank's tokens: its first global position, its length and where it
/// starts among the rank's tokens.
#[derive(Clone, Copy)]
struct Seg {
    global: usize,
    len: usize,
    local: usize,
}

/// The sequence layout every rank agreed on.
struct Ring {
    p: usize,
    rank: usize,
    /// Each rank's query and key segments.
    q: Vec<Vec<Seg>>,
    k: Vec<Vec<Seg>>,
    /// Each rank's key count.
    k_len: Vec<usize>,
    /// Key position of global query 0 under the caller's [`QueryPositions`].
    offset: i64,
}

impl Ring {
    /// The owner of the key/value part this rank holds at ring step `t`.
    fn owner(&self, t: usize) -> usize {
        (self.rank + self.p - t % self.p) % self.p
    }
    /// The options of a local call: query segment `qs` against key segment `ks`, positions
    /// relative to both.
    fn opts_for<'a>(&self, opts: &AttentionOptions<'a, RingLayout>, qs: Seg, ks: Seg) -> AttentionOptions<'a> {
        let off = (qs.global as i64).saturating_add(self.offset).saturating_sub(ks.global as i64);
        AttentionOptions {
            scale: opts.scale,
            temperature: opts.temperature,
            softcap: opts.softcap,
            causal: opts.causal,
            positions: QueryPositions::Offset(off),
            window: opts.window,
            bias: None,
            keep: None,
            tiles: opts.tiles,
            exec: opts.exec,
            variant: (),
        }
    }
    /// Elements of one contiguous `[batch, kv_heads, len, d]` operand of rank `o`.
    fn kv_elems(&self, s: &AttentionShape, o: usize) -> usize {
        AttentionShape { kv_len: self.k_len[o], ..*s }.kv_len_elems()
    }
}

/// The segments of rank `r` of `p` among `n` tokens.
fn segments(layout: RingLayout, lens: &[usize], r: usize) -> Vec<Seg> {
    let p = lens.len();
    match layout {
        RingLayout::Contiguous => vec![Seg { global: lens[..r].iter().sum(), len: lens[r], local: 0 }],
        RingLayout::Zigzag => {
            let n: usize = lens.iter().sum();
            let chunk = |i: usize| n / (2 * p) + usize::from(i < n % (2 * p));
            let start = |i: usize| (0..i).map(chunk).sum::<usize>();
            let (a, b) = (r, 2 * p - 1 - r);
            vec![
                Seg { global: start(a), len: chunk(a), local: 0 },
                Seg { global: start(b), len: chunk(b), local: chunk(a) },
            ]
        }
    }
}

/// The first agreement round: shapes, options that cannot be sharded, and the sequence
/// layout. `local` is this rank's own verdict on its inputs.
fn setup<C: Communicator>(
    comm: &C,
    s: &AttentionShape,
    opts: &AttentionOptions<'_, RingLayout>,
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
    }
    let q_lens: Vec<usize> = all.iter().map(|m| m[1] as usize).collect();
    let k_len: Vec<usize> = all.iter().map(|m| m[2] as usize).collect();
    let q: Vec<Vec<Seg>> = (0..p).map(|r| segments(opts.variant, &q_lens, r)).collect();
    let k: Vec<Vec<Seg>> = (0..p).map(|r| segments(opts.variant, &k_len, r)).collect();
    for r in 0..p {
        let (qn, kn): (usize, usize) = (q[r].iter().map(|g| g.len).sum(), k[r].iter().map(|g| g.len).sum());
        if qn != q_lens[r] || kn != k_len[r] {
            return Err(Error::BadParameter {
                name: "ring layout",
                value: format!(
                    "rank {r} holds {} queries and {} keys, the zigzag layout gives it {qn} and {kn}",
                    q_lens[r], k_len[r]
                ),
                expected: "each rank's lengths as the layout cuts the sequence",
            });
        }
    }
    let (q_total, k_total): (usize, usize) = (q_lens.iter().sum(), k_len.iter().sum());
    let offset = match opts.positions {
        QueryPositions::BottomRight => k_total as i64 - q_total as i64,
        QueryPositions::Offset(o) => o,
    };
    Ok(Ring { p, rank, q, k, k_len, offset })
}

/// The second agreement round: every rank's verdict on its first local calls.
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

/// A view of tokens `a .. a + n` of `x` (a `[batch, heads, tokens, d]` operand of `tokens`).
fn tokens<'a>(x: Heads<'a, f32>, heads: usize, tokens: usize, d: usize, a: usize) -> Heads<'a, f32> {
    let st = x.strides.unwrap_or(HeadStrides::bhsd(heads, tokens, d));
    let off = (a * st.token).min(x.data.len());
    Heads::strided(&x.data[off..], st)
}

/// This rank's keys and values, contiguous `[batch, kv_heads, kv_len, d]` each, back to back
/// (what travels around the ring). The operands were validated by the first local calls.
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

/// Rows `a .. a + n` of every `(batch, head)` of a contiguous `[bh, len, w]` buffer, contiguous.
fn rows_of(x: &[f32], bh: usize, len: usize, w: usize, a: usize, n: usize) -> Vec<f32> {
    (0..bh).flat_map(|i| x[(i * len + a) * w..(i * len + a + n) * w].iter().copied()).collect()
}

/// The inverse of [`rows_of`]: writes (`add`: adds) `src` into rows `a .. a + n`.
#[allow(clippy::too_many_arguments)]
fn put_rows(dst: &mut [f32], src: &[f32], bh: usize, len: usize, w: usize, a: usize, n: usize, add: bool) {
    for i in 0..bh {
        let d = &mut dst[(i * len + a) * w..(i * len + a + n) * w];
        let s = &src[i * n * w..(i + 1) * n * w];
        if add {
            d.iter_mut().zip(s).for_each(|(o, x)| *o += x);
        } else {
            d.copy_from_slice(s);
        }
    }
}

/// The running output of one query segment: `out` `[b, hq, n, d]` and `lse` `[b, hq, n]`,
/// merged part by part with the log-sum-exp merge.
struct Running {
    out: Vec<f32>,
    lse: Vec<f32>,
    started: bool,
}

impl Running {
    fn merge(&mut self, o: &[f32], l: &[f32], d: usize) -> Result<(), Error> {
        if !self.started {
            self.out.copy_from_slice(o);
            self.lse.copy_from_slice(l);
            self.started = true;
            return Ok(());
        }
        let rows = self.lse.len();
        let parts: Vec<f32> = self.out.iter().chain(o).copied().collect();
        let lses: Vec<f32> = self.lse.iter().chain(l).copied().collect();
        merge_attention_states(
            PartialStates { parts: 2, rows, head_dim: d, out: &parts, lse: &lses },
            &mut self.out,
            &mut self.lse,
        )
    }
}

/// This rank's query segments against the key segments of rank `o` (keys and values `k`, `v`),
/// merged into `run`.
#[allow(clippy::too_many_arguments)]
fn forward_part(
    s: &AttentionShape,
    ring: &Ring,
    q: Heads<'_, f32>,
    k: Heads<'_, f32>,
    v: Heads<'_, f32>,
    o: usize,
    opts: &AttentionOptions<'_, RingLayout>,
    run: &mut [Running],
) -> Result<(), Error> {
    let (d, bh) = (s.head_dim, s.batch * s.q_heads);
    for (qs, rq) in ring.q[ring.rank].iter().zip(run.iter_mut()) {
        for ks in &ring.k[o] {
            let shape = AttentionShape { q_len: qs.len, kv_len: ks.len, ..*s };
            let inputs = AttentionInputs::new(
                shape,
                tokens(q, s.q_heads, s.q_len, d, qs.local),
                tokens(k, s.kv_heads, ring.k_len[o], d, ks.local),
                tokens(v, s.kv_heads, ring.k_len[o], d, ks.local),
            );
            let (mut out, mut lse) = (vec![0.0f32; bh * qs.len * d], vec![0.0f32; bh * qs.len]);
            attention(inputs, AttentionOutputs::new(&mut out, Some(&mut lse)), &ring.opts_for(opts, *qs, *ks))?;
            rq.merge(&out, &lse, d)?;
        }
    }
    Ok(())
}

/// Ring attention (Liu, Zaharia & Abbeel 2023; context parallelism), forward: the sequence is
/// cut among the ranks as `opts.variant` ([`RingLayout`]) says, and each rank holds its part's
/// queries, keys and values (`inputs`, its local `AttentionShape`: `q_len`, `kv_len` this
/// rank's token counts, the other sizes the same on every rank). The key/value parts travel
/// once around the ring; while a part is in flight to the next rank (non-blocking send and
/// receive) this rank runs smax's flash attention of its queries against the part it holds,
/// and merges the partial outputs with [`merge_attention_states`] (the log-sum-exp merge, in
/// ring order).
///
/// Writes this rank's rows of the attention over the **whole** sequence into `outputs.out`
/// (contiguous `[batch, q_heads, q_len, d]`, rows in the rank's token order) and, when given,
/// their global log-sum-exp into `outputs.lse` (what [`ring_attention_backward`] takes). Masks
/// are by global position: `causal`, `window` and `positions` mean what they mean for
/// [`attention`] on the gathered sequence (`BottomRight` aligns the last global query with the
/// last global key); a block pair a query block cannot see costs no products. A score bias or
/// keep mask is not supported (it is score-shaped, not sharded). f32 only.
///
/// Equal to [`attention`] on the gathered sequence within its bound plus one f32 rounding per
/// merge: tested at `|o − o_ref| ≤ 1e-5·(1 + max|v|)` under `mpirun -n 1, 2, 4`, both layouts.
/// Memory: two key/value parts in flight and the partial outputs of this rank's queries.
///
/// Collective: every rank calls it. Errors (on every rank after an agreement round): those of
/// [`attention`] on any rank, a bias or mask, batch, heads or head dimension that differ
/// across ranks, lengths the zigzag layout does not give.
pub fn ring_attention<C: Communicator>(
    comm: &C,
    inputs: AttentionInputs<'_, f32>,
    outputs: AttentionOutputs<'_, f32>,
    opts: &AttentionOptions<'_, RingLayout>,
) -> Result<(), Error> {
    let s = inputs.shape;
    let AttentionOutputs { out, lse } = outputs;
    let local = check_len("out", out.len(), s.out_len())
        .and_then(|_| lse.as_deref().map_or(Ok(()), |l| check_len("lse", l.len(), s.lse_len())));
    let ring = setup(comm, &s, opts, local)?;
    let (d, bh) = (s.head_dim, s.batch * s.q_heads);
    let mut run: Vec<Running> = ring.q[ring.rank]
        .iter()
        .map(|g| Running { out: vec![0.0; bh * g.len * d], lse: vec![0.0; bh * g.len], started: false })
        .collect();
    // Step 0: this rank's own keys and values, straight from the caller's buffers (validates
    // them on every rank before anything travels).
    let first = forward_part(&s, &ring, inputs.q, inputs.k, inputs.v, ring.rank, opts, &mut run);
    confirm(comm, first)?;
    ring_pass(
        comm,
        &ring,
        &s,
        pack(&s, inputs.k, inputs.v),
        |o, k, v| forward_part(&s, &ring, inputs.q, k, v, o, opts, &mut run),
        |_| {},
    )?;
    let mut own_lse = Vec::new();
    let lse: &mut [f32] = match lse {
        Some(l) => l,
        None => {
            own_lse.resize(s.lse_len(), 0.0);
            &mut own_lse
        }
    };
    for (g, r) in ring.q[ring.rank].iter().zip(&run) {
        put_rows(out, &r.out, bh, s.q_len, d, g.local, g.len, false);
        put_rows(lse, &r.lse, bh, s.q_len, 1, g.local, g.len, false);
    }
    Ok(())
}

/// The next and the previous rank on the ring.
fn neighbours<'c, C: Communicator>(
    comm: &'c C,
    ring: &Ring,
) -> (mpi::topology::Process<'c>, mpi::topology::Process<'c>) {
    (
        comm.process_at_rank(((ring.rank + 1) % ring.p) as i32),
        comm.process_at_rank(((ring.rank + ring.p - 1) % ring.p) as i32),
    )
}

/// Passes the key/value parts around the ring. At step `t` this rank holds the part of rank
/// `ring.owner(t)` (`held`, keys then values); from step 1 on, `step(owner, k, v)` runs on it
/// while the part is forwarded to the next rank and the following one arrives (non-blocking),
/// and after each step `after(t)` runs (every rank reaches it, whatever `step` returned). Step
/// 0 is the caller's (its own part, from its own buffers). Returns the first error of `step`,
/// once every rank has finished the ring.
fn ring_pass<C: Communicator>(
    comm: &C,
    ring: &Ring,
    s: &AttentionShape,
    mut held: Vec<f32>,
    mut step: impl FnMut(usize, Heads<'_, f32>, Heads<'_, f32>) -> Result<(), Error>,
    mut after: impl FnMut(usize),
) -> Result<(), Error> {
    if ring.p == 1 {
        return Ok(());
    }
    let (next, prev) = neighbours(comm, ring);
    let mut incoming = Vec::new();
    let mut result = Ok(());
    for t in 0..ring.p {
        let last = t + 1 == ring.p;
        incoming.resize(if last { 0 } else { 2 * ring.kv_elems(s, ring.owner(t + 1)) }, 0.0);
        mpi::request::scope(|sc| {
            let sent = (!last).then(|| next.immediate_send(sc, &held[..]));
            let recv = (!last).then(|| prev.immediate_receive_into(sc, &mut incoming[..]));
            if t > 0 && result.is_ok() {
                let (k, v) = held.split_at(held.len() / 2);
                result = step(ring.owner(t), Heads::new(k), Heads::new(v));
            }
            if let Some(r) = recv {
                r.wait();
            }
            if let Some(r) = sent {
                r.wait();
            }
        });
        std::mem::swap(&mut held, &mut incoming);
        after(t);
    }
    result
}

fn check_len(what: &'static str, len: usize, expected: usize) -> Result<(), Error> {
    if len == expected { Ok(()) } else { Err(Error::LengthMismatch { what, len, expected }) }
}

/// The gradient terms of this rank's query segments against the key segments of rank `o`:
/// `dq` added into `dq_seg` (one buffer per query segment), `dk`, `dv` added into `acc`
/// (`[dk | dv]` of rank `o`'s part, contiguous).
#[allow(clippy::too_many_arguments)]
fn backward_part(
    s: &AttentionShape,
    ring: &Ring,
    q: Heads<'_, f32>,
    k: Heads<'_, f32>,
    v: Heads<'_, f32>,
    o: usize,
    seg: &[(Vec<f32>, Vec<f32>, Vec<f32>)],
    opts: &AttentionOptions<'_, RingLayout>,
    dq_seg: &mut [Vec<f32>],
    acc: &mut [f32],
) -> Result<(), Error> {
    let (d, bhq, bhk) = (s.head_dim, s.batch * s.q_heads, s.batch * s.kv_heads);
    let kl = ring.k_len[o];
    let nk = bhk * kl * d;
    for ((qs, (out, lse, dout)), dq) in ring.q[ring.rank].iter().zip(seg).zip(dq_seg.iter_mut()) {
        for ks in &ring.k[o] {
            let shape = AttentionShape { q_len: qs.len, kv_len: ks.len, ..*s };
            let inputs = AttentionInputs::new(
                shape,
                tokens(q, s.q_heads, s.q_len, d, qs.local),
                tokens(k, s.kv_heads, kl, d, ks.local),
                tokens(v, s.kv_heads, kl, d, ks.local),
            );
            let (mut gq, mut gk, mut gv) =
                (vec![0.0f32; bhq * qs.len * d], vec![0.0f32; bhk * ks.len * d], vec![0.0f32; bhk * ks.len * d]);
            attention_backward(
                inputs,
                out,
                lse,
                dout,
                AttentionGrads::new(&mut gq, &mut gk, &mut gv),
                &ring.opts_for(opts, *qs, *ks),
            )?;
            dq.iter_mut().zip(&gq).for_each(|(a, x)| *a += x);
            let (dk, dv) = acc.split_at_mut(nk);
            put_rows(dk, &gk, bhk, kl, d, ks.local, ks.len, true);
            put_rows(dv, &gv, bhk, kl, d, ks.local, ks.len, true);
        }
    }
    Ok(())
}

/// Ring attention, backward: from this rank's inputs (as given to [`ring_attention`]), its
/// rows of the forward output `out`, their global log-sum-exp `lse` and the upstream gradient
/// `d_out`, writes this rank's `dq` and the gradients `dk`, `dv` of **its own** keys and
/// values (contiguous, as [`attention_backward`]'s).
///
/// The key/value parts travel around the ring with their gradient accumulators: at each step
/// this rank runs smax's flash backward of its queries against the part it holds (the exact
/// gradient terms of those (query, key) pairs, since `out` and `lse` are the global ones),
/// adds the part's `dk`, `dv` terms to its accumulators and passes part and accumulators on;
/// after `P` steps every accumulator is home. The next part's keys and values are received
/// (non-blocking) while the local backward runs; the accumulators move after it.
///
/// Equal to [`attention_backward`] on the gathered sequence within its bound, summed over
/// parts in f32 (`dq` over the parts in ring order, `dk`, `dv` over the ranks in ring order):
/// tested within `2e-5` of the largest gradient under `mpirun -n 1, 2, 4`, both layouts. A
/// score-bias gradient is not supported. Collective, with the errors of [`ring_attention`] and
/// [`attention_backward`].
#[allow(clippy::too_many_arguments)]
pub fn ring_attention_backward<C: Communicator>(
    comm: &C,
    inputs: AttentionInputs<'_, f32>,
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    grads: AttentionGrads<'_, f32>,
    opts: &AttentionOptions<'_, RingLayout>,
) -> Result<(), Error> {
    let s = inputs.shape;
    let AttentionGrads { dq, dk, dv, d_bias } = grads;
    let local = match d_bias {
        Some(_) => Err(Error::Unsupported { what: "d_bias", why: "ring attention takes no score bias" }),
        None => check_len("out", out.len(), s.out_len())
            .and_then(|_| check_len("lse", lse.len(), s.lse_len()))
            .and_then(|_| check_len("d_out", d_out.len(), s.out_len()))
            .and_then(|_| check_len("dq", dq.len(), s.out_len()))
            .and_then(|_| check_len("dk", dk.len(), s.kv_len_elems()))
            .and_then(|_| check_len("dv", dv.len(), s.kv_len_elems())),
    };
    let ring = setup(comm, &s, opts, local)?;
    let (d, bhq) = (s.head_dim, s.batch * s.q_heads);
    let nk = s.kv_len_elems();
    // Each query segment's rows of `out`, `lse` and `d_out`, contiguous.
    let seg: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = ring.q[ring.rank]
        .iter()
        .map(|g| {
            (
                rows_of(out, bhq, s.q_len, d, g.local, g.len),
                rows_of(lse, bhq, s.q_len, 1, g.local, g.len),
                rows_of(d_out, bhq, s.q_len, d, g.local, g.len),
            )
        })
        .collect();
    let mut dq_seg: Vec<Vec<f32>> = ring.q[ring.rank].iter().map(|g| vec![0.0f32; bhq * g.len * d]).collect();
    // The accumulators of the part held, [dk | dv]; step 0 is this rank's own part.
    let mut acc = vec![0.0f32; 2 * nk];
    let first = backward_part(&s, &ring, inputs.q, inputs.k, inputs.v, ring.rank, &seg, opts, &mut dq_seg, &mut acc);
    confirm(comm, first)?;
    // The accumulators follow their part; after the last step they reach its owner.
    let acc = std::cell::RefCell::new(acc);
    let mut acc_in = Vec::new();
    ring_pass(
        comm,
        &ring,
        &s,
        pack(&s, inputs.k, inputs.v),
        |o, k, v| backward_part(&s, &ring, inputs.q, k, v, o, &seg, opts, &mut dq_seg, &mut acc.borrow_mut()),
        |t| {
            let (next, prev) = neighbours(comm, &ring);
            acc_in.resize(2 * ring.kv_elems(&s, ring.owner(t + 1)), 0.0);
            let mut a = acc.borrow_mut();
            send_receive_into(&a[..], &next, &mut acc_in[..], &prev);
            std::mem::swap(&mut *a, &mut acc_in);
        },
    )?;
    let acc = acc.into_inner();
    for (g, x) in ring.q[ring.rank].iter().zip(&dq_seg) {
        put_rows(dq, x, bhq, s.q_len, d, g.local, g.len, false);
    }
    dk.copy_from_slice(&acc[..nk]);
    dv.copy_from_slice(&acc[nk..]);
    Ok(())
}
