//! Linear cross-entropy (Cut Cross-Entropy, Wijmans et al. 2024; ALGORITHMS.md L9): the
//! cross-entropy of `logits = h·Wᵀ + b` without the `N x V` logits.
//!
//! Forward: over token tiles × vocabulary tiles (in that order), one product forms a tile of
//! logits in scratch, and each row's running (max, Σ exp) state absorbs it; the target logit
//! and the smoothing sum are picked up on the way. Backward (in the same call): over vocabulary
//! tiles × token tiles, the tile is formed again, turned into the gradient of the logits in
//! place, and two products accumulate it into `dh` and `dW` (plus a column sum into `db`).
//! Four products in all, against three for a materialized path; the memory is one tile.

use crate::arch::gemm::{MatRef, matmul};
use crate::arch::rows::{self as k, Xform};
use crate::arch::{Ahead, Isa, SimdLevel, Task, dispatch};
use crate::check::product;
use crate::error::{Error, Result};
use crate::options::{Exec, Par, defaults, setters};
use rayon::prelude::*;

use super::{AllIgnored, LossReport, Reduction, RowOutputs};

defaults! {
    /// Tile sizes of [`linear_cross_entropy`]: `tokens x vocab` logits live in scratch at once.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct LinearTiles {
        /// Token rows per tile (default 512).
        pub tokens: usize = 512,
        /// Vocabulary columns per tile (default 1024).
        pub vocab: usize = 1024,
    }
}

impl LinearTiles {
    /// The tiles a call of `shape` uses: never larger than the problem.
    fn clamped(self, shape: LinearShape) -> LinearTiles {
        LinearTiles { tokens: self.tokens.min(shape.n.max(1)), vocab: self.vocab.min(shape.v.max(1)) }
    }
}

defaults! {
    /// Options of [`linear_cross_entropy`]; the shared fields mean what they mean for
    /// [`cross_entropy`](super::cross_entropy) (no class weights, no temperature here).
    #[derive(Debug, Clone, Copy)]
    pub struct LinearCrossEntropyOptions {
        /// How tokens combine (mean over non-ignored tokens by default).
        pub reduction: Reduction = Reduction::Mean,
        /// Tokens whose target equals this contribute 0 (default −100).
        pub ignore_index: i64 = -100,
        /// Label smoothing ε in `[0, 1]`.
        pub label_smoothing: f64 = 0.0,
        /// PaLM z-loss coefficient λ ≥ 0.
        pub z_loss: f64 = 0.0,
        /// Logit soft cap `c > 0` (applied after the bias).
        pub softcap: Option<f64> = None,
        /// Upstream gradient of the returned loss.
        pub grad_scale: f64 = 1.0,
        /// The mean over zero valid tokens.
        pub all_ignored: AllIgnored = AllIgnored::Zero,
        /// Gradient filtering (CCE §4.3), off by default (exact): skip a tile's two gradient
        /// products (`dh`, `dW`; `dbias` is never filtered) when every entry of its logit
        /// gradient, taken before the soft cap's chain factor as CCE's code does, is below
        /// `filter` times the per-token scale of the reduction (i.e. `|p − q| < filter` for a
        /// plain mean, `q` the smoothed one-hot target). CCE's value for bf16 accumulation is
        /// `2⁻¹²`; for f32, `2⁻²⁸`.
        pub filter: Option<f32> = None,
        /// Tile sizes.
        pub tiles: LinearTiles = LinearTiles::default(),
        /// Threads (products and tile work) and the SIMD level of the tile work.
        pub exec: Exec = Exec::default(),
    }
}

setters!(LinearCrossEntropyOptions {
    reduction: Reduction, ignore_index: i64, label_smoothing: f64, z_loss: f64, grad_scale: f64,
    all_ignored: AllIgnored, tiles: LinearTiles,
} some { softcap: f64, filter: f32 });

/// Sizes of a linear cross-entropy: `n` tokens, hidden size `d`, vocabulary `v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearShape {
    /// Tokens (rows of `h`).
    pub n: usize,
    /// Hidden size (columns of `h` and `W`).
    pub d: usize,
    /// Vocabulary (rows of `W`).
    pub v: usize,
}

/// The inputs: `h [n x d]` and `w [v x d]` row-major and contiguous, an optional bias `[v]`,
/// and one target per token.
#[derive(Debug, Clone, Copy)]
pub struct LinearInputs<'a> {
    /// Hidden states, `n x d`.
    pub h: &'a [f32],
    /// Classifier, `v x d`.
    pub w: &'a [f32],
    /// Bias, `v` (optional).
    pub bias: Option<&'a [f32]>,
    /// Targets, `n`, in `[0, v)` or the ignore index.
    pub targets: &'a [i64],
}

/// Gradient outputs (each overwritten when given): `dh [n x d]`, `dw [v x d]`, `dbias [v]`.
#[derive(Debug, Default)]
pub struct LinearGrads<'a> {
    /// `∂loss/∂h`.
    pub dh: Option<&'a mut [f32]>,
    /// `∂loss/∂W`.
    pub dw: Option<&'a mut [f32]>,
    /// `∂loss/∂b`.
    pub dbias: Option<&'a mut [f32]>,
}

#[derive(Debug, Clone, Copy)]
struct Tok {
    m: f32,
    s: f64,
    ty: f32,
    sum_t: f64,
    nan: bool,
    lse: f64,
    /// The target's logit over the whole vocabulary (`ty`, or the shards' combination).
    ty_global: f64,
}

const TOK0: Tok =
    Tok { m: f32::NEG_INFINITY, s: 0.0, ty: f32::NAN, sum_t: 0.0, nan: false, lse: f64::NAN, ty_global: f64::NAN };

/// Working memory of [`linear_cross_entropy`]: one tile of logits and a few numbers per token.
/// Build it once with [`LinearCeScratch::new`] and pass it to every call: a call that gets a
/// scratch large enough allocates nothing of its own beyond what `gemm` packs.
#[derive(Debug, Default)]
pub struct LinearCeScratch {
    tile: Vec<f32>,
    tok: Vec<Tok>,
}

impl LinearCeScratch {
    /// Scratch for calls of `shape` with `tiles` (tiles larger than the problem are clamped
    /// to it, as the call does). Errors: [`Error::SizeOverflow`] when a size does not fit in
    /// `usize`, [`Error::Allocation`] when the allocator refuses it.
    pub fn new(shape: LinearShape, tiles: LinearTiles) -> Result<Self> {
        let mut s = LinearCeScratch::default();
        s.fit(shape.n, tiles.clamped(shape))?;
        Ok(s)
    }

    /// Bytes this scratch holds: [`linear_cross_entropy_scratch_bytes`] of its sizes.
    pub fn bytes(&self) -> usize {
        self.tile.len() * 4 + self.tok.len() * core::mem::size_of::<Tok>()
    }

    /// Grows the buffers to `n` tokens and one tile of `tiles` (clamped), fallibly.
    fn fit(&mut self, n: usize, tiles: LinearTiles) -> Result<()> {
        let t = product("tiles", &[tiles.tokens, tiles.vocab])?;
        let grow = |len: usize, want: usize| want.saturating_sub(len);
        self.tile
            .try_reserve_exact(grow(self.tile.len(), t))
            .map_err(|_| Error::Allocation { what: "linear cross-entropy tile", bytes: t.saturating_mul(4) })?;
        self.tok.try_reserve_exact(grow(self.tok.len(), n)).map_err(|_| Error::Allocation {
            what: "linear cross-entropy tokens",
            bytes: n.saturating_mul(core::mem::size_of::<Tok>()),
        })?;
        if self.tile.len() < t {
            self.tile.resize(t, 0.0);
        }
        if self.tok.len() < n {
            self.tok.resize(n, TOK0);
        }
        Ok(())
    }
}

/// Bytes of working memory a call of `shape` with `tiles` uses (the scratch): one tile of
/// `tokens·vocab` f32 (each clamped to the problem) plus 40 bytes per token. It does not grow
/// with `v` once `v ≥ tiles.vocab`, nor with `d`.
pub fn linear_cross_entropy_scratch_bytes(shape: LinearShape, tiles: LinearTiles) -> usize {
    let t = tiles.clamped(shape);
    t.tokens
        .saturating_mul(t.vocab)
        .saturating_mul(4)
        .saturating_add(shape.n.saturating_mul(core::mem::size_of::<Tok>()))
}

/// Cross-entropy of `logits = h·Wᵀ + b` (optionally soft-capped) against `targets`, with the
/// loss and, in the same call, the gradients with respect to `h`, `W` and `b`, never forming
/// the `n x v` logits (Cut Cross-Entropy, Wijmans et al. 2024, arXiv 2411.09009).
///
/// The loss, reduction, ignore index, label smoothing, z-loss and cap follow
/// [`cross_entropy`](super::cross_entropy) exactly (same formulas; the tests check the two
/// agree). Exact by default: every tile enters every gradient; [`LinearCrossEntropyOptions::filter`] opts into
/// CCE's gradient filtering.
///
/// Algorithm: tiles of `tiles.tokens x tiles.vocab` logits, formed by `gemm` (f32
/// accumulation over `d`) in scratch; per token, the running (max, Σ exp) state merges tile
/// by tile in vocabulary order (f64 sums of f32 blocks), so the result is bitwise identical
/// for any thread count. The backward recomputes each tile. Working memory:
/// [`linear_cross_entropy_scratch_bytes`], from `scratch` when given.
///
/// Accuracy: the logits are f32 dot products of length `d` (error ≈ `d·2⁻²⁴·|h||w|` in the
/// worst case, far less in practice); past them, as `cross_entropy` on those logits.
///
/// Errors: buffers whose lengths disagree with `shape` ([`Error::LengthMismatch`]), `d = 0`
/// or `v = 0`, targets out of range, a row output of the wrong length, parameters out of
/// range, tile sizes of 0.
pub fn linear_cross_entropy(
    shape: LinearShape,
    inp: LinearInputs<'_>,
    grads: LinearGrads<'_>,
    rows_out: RowOutputs<'_>,
    scratch: Option<&mut LinearCeScratch>,
    opts: &LinearCrossEntropyOptions,
) -> Result<LossReport> {
    run(shape, inp, grads, rows_out, scratch, None, opts)
}

/// One row's statistics over a vocabulary shard, as [`linear_cross_entropy_sharded`] and
/// [`cross_entropy_sharded`](super::cross_entropy_sharded) hand them to their combiner and
/// take them back: over this shard's classes, then over the whole vocabulary once combined
/// (with [`ShardRow::merge`]). The values are of the transformed logits `t` (bias, soft cap
/// and temperature applied).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShardRow {
    /// Log-sum-exp of `t` over the classes (`-inf` when all are `-inf`; NaN for a row with a
    /// NaN logit; `+inf` for a `+inf` one under no cap, whose loss is then NaN).
    pub lse: f64,
    /// `t` at the token's target when the target lies in this shard, else 0 (also 0 for an
    /// ignored token), so that the combined value is the sum over shards.
    pub target_logit: f64,
    /// `Σ w_k·t_k` over the shard's classes (`w` the class weights, 1 without them; label
    /// smoothing only, 0 without it).
    pub logit_sum: f64,
}

impl ShardRow {
    /// The statistics of the union of disjoint shards, from theirs **in the order given**
    /// (pass them in shard order so that every process merging the same parts gets the same
    /// bits): the log-sum-exps fold through [`LseState`](crate::LseState)`<f64>` (parts at
    /// `-inf` are the identity; NaN if any part is NaN, else `+inf` if any is `+inf`); the
    /// target logit and the logit sum add up in order.
    pub fn merge(parts: impl IntoIterator<Item = ShardRow>) -> ShardRow {
        let mut out = ShardRow { lse: f64::NEG_INFINITY, target_logit: 0.0, logit_sum: 0.0 };
        let mut st = crate::LseState::<f64>::EMPTY;
        for p in parts {
            out.target_logit += p.target_logit;
            out.logit_sum += p.logit_sum;
            st = st.merge(crate::LseState::<f64>::from_value(p.lse));
        }
        out.lse = st.lse();
        out
    }
}

/// Where a call of [`linear_cross_entropy_sharded`] or
/// [`cross_entropy_sharded`](super::cross_entropy_sharded) sits in the vocabulary, and how
/// its per-row statistics meet the other shards'.
pub struct VocabShard<'a> {
    /// The first class of this shard: its `v` classes are `start .. start + v` of `total`.
    pub start: usize,
    /// The whole vocabulary.
    pub total: usize,
    /// Called with consecutive blocks of rows (tokens), in row order, between the statistics
    /// and the losses: it must overwrite each [`ShardRow`] with the combination over every
    /// shard (the same on every shard: [`ShardRow::merge`] in shard order). The blocks depend
    /// only on the row count, `total` and the element type, so every shard sees the same ones
    /// ([`linear_cross_entropy_sharded`]: one block of all tokens;
    /// [`cross_entropy_sharded`](super::cross_entropy_sharded): blocks of about 8 MiB of
    /// whole-vocabulary logits). An error it returns is the call's.
    pub combine: &'a mut dyn FnMut(&mut [ShardRow]) -> Result<()>,
}

impl core::fmt::Debug for VocabShard<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VocabShard").field("start", &self.start).field("total", &self.total).finish_non_exhaustive()
    }
}

/// [`linear_cross_entropy`] over one shard of the vocabulary (Megatron-style vocabulary
/// parallelism): `w` (`v x d`) and `bias` (`v`) are the classes `shard.start .. shard.start + v`
/// of `shard.total`; `h` and the targets (global class indices) are the whole batch's. The
/// forward sweep computes each token's [`ShardRow`] over this shard's tiles;
/// `shard.combine` turns them into the whole vocabulary's (another process's statistics
/// arrive there: MPI in `smax-mpi`, threads, anything); the losses and the backward sweep then
/// use the global log-sum-exp, so the gradient of this shard's logits is the exact global one,
/// never materialised.
///
/// Outputs: the loss and row outputs of the whole vocabulary (the same on every shard that
/// combines the same rows); `dw`, `dbias` of this shard; `dh` **this shard's term**
/// `Σ_{k in shard} ∂loss/∂z_k · W_k` — the full `∂loss/∂h` is the sum of the shards' `dh`.
/// Label smoothing spreads `ε/total` over the whole vocabulary.
///
/// Equal to [`linear_cross_entropy`] on the whole classifier up to the f64 merge of the
/// shards' log-sum-exps (a few f64 ULP) and the order of the `dh` sum over shards (tested
/// against it with 1–4 shards). Errors: those of `linear_cross_entropy`, with targets checked
/// against `total`; a shard outside `[0, total)`; the combiner's.
pub fn linear_cross_entropy_sharded(
    shape: LinearShape,
    inp: LinearInputs<'_>,
    grads: LinearGrads<'_>,
    rows_out: RowOutputs<'_>,
    scratch: Option<&mut LinearCeScratch>,
    shard: VocabShard<'_>,
    opts: &LinearCrossEntropyOptions,
) -> Result<LossReport> {
    if shard.start.checked_add(shape.v).is_none_or(|end| end > shard.total) {
        return Err(Error::bad_parameter(
            "shard",
            format!("start {} + v {} of total {}", shard.start, shape.v, shard.total),
            "a range of classes inside [0, total)",
        ));
    }
    run(shape, inp, grads, rows_out, scratch, Some(shard), opts)
}

fn run(
    shape: LinearShape,
    inp: LinearInputs<'_>,
    grads: LinearGrads<'_>,
    rows_out: RowOutputs<'_>,
    scratch: Option<&mut LinearCeScratch>,
    shard: Option<VocabShard<'_>>,
    opts: &LinearCrossEntropyOptions,
) -> Result<LossReport> {
    let classes = shard.as_ref().map_or(shape.v, |s| s.total);
    check(shape, classes, &inp, &grads, &rows_out, opts)?;
    // A shard's tiles see its own columns: targets in it shift to local indices, the others
    // become `i64::MAX` (no column matches it), and ignored tokens `i64::MIN`, the ignore index
    // of the sweeps (a user's ignore index may equal a local index).
    let local_targets: Vec<i64>;
    let local_opts;
    let (inp, opts) = match &shard {
        None => (inp, opts),
        Some(s) => {
            let mut t = crate::check::try_with_capacity("linear cross-entropy shard targets", shape.n)?;
            t.extend(
                inp.targets.iter().map(|&y| super::ce::shard::local_target(y, s.start, shape.v, opts.ignore_index)),
            );
            local_targets = t;
            local_opts = LinearCrossEntropyOptions { ignore_index: super::ce::shard::IGNORED, ..*opts };
            (LinearInputs { targets: &local_targets, ..inp }, &local_opts)
        }
    };
    let mut own;
    let scratch = match scratch {
        Some(s) => s,
        None => {
            own = LinearCeScratch::default();
            &mut own
        }
    };
    // Tiles never larger than the problem (so absurd tile sizes cannot ask for absurd memory);
    // `fit` checks and allocates the rest fallibly.
    let tiles = opts.tiles.clamped(shape);
    scratch.fit(shape.n, tiles)?;
    let LinearCeScratch { tile, tok } = scratch;
    let tok = &mut tok[..shape.n];
    tok.fill(TOK0);
    let sw = Sweep {
        shape,
        inp: &inp,
        bn: tiles.tokens,
        bv: tiles.vocab,
        level: SimdLevel::resolve(opts.exec.simd),
        xf: Xform { k: 1.0, cap: opts.softcap.unwrap_or(0.0) as f32 },
        par: opts.exec.par,
    };
    sw.forward(tile, tok, opts.label_smoothing != 0.0);
    for st in tok.iter_mut() {
        st.lse = token_lse(st);
    }
    if let Some(s) = shard {
        let mut rows = crate::check::try_with_capacity("linear cross-entropy shard rows", shape.n)?;
        rows.extend(tok.iter().zip(inp.targets).map(|(st, &y)| ShardRow {
            lse: st.lse,
            target_logit: if y == super::ce::shard::OUTSIDE || y == opts.ignore_index { 0.0 } else { st.ty as f64 },
            logit_sum: st.sum_t,
        }));
        (s.combine)(&mut rows)?;
        if rows.len() != shape.n {
            return Err(Error::RowCountMismatch { what: "combined shard rows", len: rows.len(), rows: shape.n });
        }
        for (st, r) in tok.iter_mut().zip(&rows) {
            st.lse = r.lse;
            st.ty_global = r.target_logit;
            st.sum_t = r.logit_sum;
        }
    } else {
        for st in tok.iter_mut() {
            st.ty_global = st.ty as f64;
        }
    }
    let (result, scale) = token_losses(tok, inp.targets, classes, rows_out, opts);
    sw.backward(tile, tok, grads, scale, classes, opts);
    Ok(result)
}

/// What both sweeps over the `tokens x vocab` tiles share.
struct Sweep<'a, 'i> {
    shape: LinearShape,
    inp: &'a LinearInputs<'i>,
    bn: usize,
    bv: usize,
    level: SimdLevel,
    xf: Xform,
    par: Par,
}

impl Sweep<'_, '_> {
    /// Forward sweep, token tiles × vocabulary tiles: each tile's statistics merge into the
    /// per-token states in vocabulary order.
    fn forward(&self, tile: &mut [f32], tok: &mut [Tok], smooth: bool) {
        let LinearShape { n, d, v } = self.shape;
        let (bn, bv, y) = (self.bn, self.bv, self.inp.targets);
        for i0 in (0..n).step_by(bn) {
            let nb = bn.min(n - i0);
            for j0 in (0..v).step_by(bv) {
                let vb = bv.min(v - j0);
                let t = &mut tile[..nb * vb];
                logits_tile(t, self.inp, d, i0, nb, j0, vb, self.par);
                let bias = self.inp.bias.map(|b| &b[j0..j0 + vb]);
                rows_par(self.par, t, vb, &mut tok[i0..i0 + nb], |r0, tr, st| {
                    dispatch(self.level, TileFwd { t: tr, vb, bias, xf: self.xf, st, y: &y[i0 + r0..], j0, smooth })
                });
            }
        }
    }

    /// Backward sweep, vocabulary tiles × token tiles: each tile is recomputed, turned into the
    /// logit gradient in place, and accumulated into the asked-for gradients.
    fn backward(
        &self,
        tile: &mut [f32],
        tok: &[Tok],
        grads: LinearGrads<'_>,
        scale: f64,
        classes: usize,
        opts: &LinearCrossEntropyOptions,
    ) {
        let LinearShape { n, d, v } = self.shape;
        let (bn, bv, y, inp) = (self.bn, self.bv, self.inp.targets, self.inp);
        let LinearGrads { mut dh, mut dw, mut dbias } = grads;
        if dh.is_none() && dw.is_none() && dbias.is_none() {
            return;
        }
        for g in [dh.as_deref_mut(), dw.as_deref_mut(), dbias.as_deref_mut()].into_iter().flatten() {
            g.fill(0.0);
        }
        let eps = opts.label_smoothing;
        let (alpha, beta) = (1.0 - eps, eps / classes as f64);
        let gc = GradConsts {
            xf: self.xf,
            cap64: opts.softcap.unwrap_or(0.0),
            scale,
            z_scale: scale,
            lambda: opts.z_loss,
            alpha,
            beta,
            big_u: alpha + beta * classes as f64,
            ignore: opts.ignore_index,
            pre_chain: opts.filter.is_some() && opts.softcap.is_some(),
        };
        for j0 in (0..v).step_by(bv) {
            let vb = bv.min(v - j0);
            for i0 in (0..n).step_by(bn) {
                let nb = bn.min(n - i0);
                let t = &mut tile[..nb * vb];
                logits_tile(t, inp, d, i0, nb, j0, vb, self.par);
                let bias = inp.bias.map(|b| &b[j0..j0 + vb]);
                let maxg: f32 = rows_par_max(self.par, t, vb, &tok[i0..i0 + nb], |r0, tr, st| {
                    dispatch(self.level, TileBwd { t: tr, vb, bias, st, y: &y[i0 + r0..], j0, c: gc })
                });
                if let Some(db) = dbias.as_deref_mut() {
                    let db = &mut db[j0..j0 + vb];
                    for r in t.chunks(vb) {
                        for (o, &g) in db.iter_mut().zip(r) {
                            *o += g;
                        }
                    }
                }
                if let Some(f) = opts.filter {
                    if maxg < f * scale as f32 {
                        continue;
                    }
                }
                let g = MatRef::row_major(t, nb, vb);
                if let Some(dh) = dh.as_deref_mut() {
                    let wj = MatRef::row_major(&inp.w[j0 * d..(j0 + vb) * d], vb, d);
                    matmul(&mut dh[i0 * d..(i0 + nb) * d], d, g, wj, true, self.par);
                }
                if let Some(dw) = dw.as_deref_mut() {
                    let hi = MatRef::row_major(&inp.h[i0 * d..(i0 + nb) * d], nb, d);
                    matmul(&mut dw[j0 * d..(j0 + vb) * d], d, g.t(), hi, true, self.par);
                }
            }
        }
    }
}

/// A token's log-sum-exp from its merged state.
fn token_lse(st: &Tok) -> f64 {
    if st.nan || st.s.is_nan() {
        f64::NAN
    } else if st.m == f32::NEG_INFINITY {
        f64::NEG_INFINITY
    } else if st.m == f32::INFINITY {
        f64::INFINITY
    } else {
        st.m as f64 + st.s.ln()
    }
}

/// Per-token loss from the tokens' log-sum-exps and target logits (row order), the per-row
/// outputs, and the reduction over `v` classes; also returns the gradient scale of the
/// reduction.
fn token_losses(
    tok: &[Tok],
    y: &[i64],
    v: usize,
    rows_out: RowOutputs<'_>,
    opts: &LinearCrossEntropyOptions,
) -> (LossReport, f64) {
    let valid_rows = y.iter().filter(|&&t| t != opts.ignore_index).count();
    let den = if opts.reduction == Reduction::Mean { valid_rows as f64 } else { 1.0 };
    let scale = if den > 0.0 { opts.grad_scale / den } else { 0.0 };
    let smooth = opts.label_smoothing != 0.0;
    let eps = opts.label_smoothing;
    let alpha = 1.0 - eps;
    let beta = eps / v as f64;
    let (mut lsum, mut zsum) = (0.0f64, 0.0f64);
    let RowOutputs { loss: mut lrow, z_loss: mut zrow, lse: mut lserow } = rows_out;
    for (i, st) in tok.iter().enumerate() {
        let lse = st.lse;
        let (l, z) = if y[i] == opts.ignore_index {
            (0.0, 0.0)
        } else if lse.is_nan() || lse == f64::INFINITY {
            // As `cross_entropy`'s special rows: the z-loss of a NaN row is NaN, of a `+inf` one `+inf`.
            (f64::NAN, if opts.z_loss > 0.0 { opts.z_loss * lse * lse } else { 0.0 })
        } else if lse == f64::NEG_INFINITY {
            (f64::INFINITY, if opts.z_loss > 0.0 { f64::INFINITY } else { 0.0 })
        } else {
            let mut l = alpha * (lse - st.ty_global);
            if smooth {
                l += beta * (v as f64 * lse - st.sum_t);
            }
            (l, opts.z_loss * lse * lse)
        };
        lsum += l;
        zsum += z;
        if let Some(b) = lrow.as_deref_mut() {
            b[i] = l;
        }
        if let Some(b) = zrow.as_deref_mut() {
            b[i] = z;
        }
        if let Some(b) = lserow.as_deref_mut() {
            b[i] = lse;
        }
    }
    let (loss, z_loss) = super::reduced(opts.reduction, opts.all_ignored, (lsum, den), (zsum, den));
    let report = LossReport { loss, z_loss, valid_rows, denominator: den, flagged_rows: 0 };
    (report, scale)
}

fn check(
    s: LinearShape,
    classes: usize,
    inp: &LinearInputs<'_>,
    g: &LinearGrads<'_>,
    ro: &RowOutputs<'_>,
    o: &LinearCrossEntropyOptions,
) -> Result<()> {
    let LinearShape { n, d, v } = s;
    let prod = |a: usize, b: usize, what: &'static str| product(what, &[a, b]);
    let (nd, vd) = (prod(n, d, "h")?, prod(v, d, "w")?);
    if d == 0 || v == 0 {
        return Err(Error::bad_parameter(
            if d == 0 { "d" } else { "v" },
            "0",
            "at least 1 (a hidden size and a vocabulary)",
        ));
    }
    let len = |what, got: usize, want: usize| {
        if got == want { Ok(()) } else { Err(Error::LengthMismatch { what, len: got, expected: want }) }
    };
    len("h", inp.h.len(), nd)?;
    len("w", inp.w.len(), vd)?;
    crate::check::targets(inp.targets, n, classes, Some(o.ignore_index))?;
    if let Some(b) = inp.bias {
        len("bias", b.len(), v)?;
    }
    if let Some(x) = &g.dh {
        len("dh", x.len(), nd)?;
    }
    if let Some(x) = &g.dw {
        len("dw", x.len(), vd)?;
    }
    if let Some(x) = &g.dbias {
        len("dbias", x.len(), v)?;
    }
    for (what, b) in [("loss", &ro.loss), ("z_loss", &ro.z_loss), ("lse", &ro.lse)] {
        if let Some(b) = b {
            if b.len() != n {
                return Err(Error::RowCountMismatch { what, len: b.len(), rows: n });
            }
        }
    }
    let bad = |name, value: String, expected| Err(Error::bad_parameter(name, value, expected));
    if o.tiles.tokens == 0 || o.tiles.vocab == 0 {
        return bad("tiles", format!("{:?}", o.tiles), "tokens >= 1 and vocab >= 1");
    }
    // The shared options, validated as cross_entropy validates them.
    let ce = super::CrossEntropyOptions {
        label_smoothing: o.label_smoothing,
        z_loss: o.z_loss,
        softcap: o.softcap,
        grad_scale: o.grad_scale,
        ..Default::default()
    };
    ce.check(true)?;
    if let Some(f) = o.filter {
        if !(f.is_finite() && f >= 0.0) {
            return bad("filter", format!("{f}"), "finite and >= 0");
        }
    }
    Ok(())
}

/// `t (nb x vb) = h[i0..i0+nb] · W[j0..j0+vb]ᵀ`.
#[allow(clippy::too_many_arguments)]
fn logits_tile(t: &mut [f32], inp: &LinearInputs<'_>, d: usize, i0: usize, nb: usize, j0: usize, vb: usize, par: Par) {
    let hi = MatRef::row_major(&inp.h[i0 * d..(i0 + nb) * d], nb, d);
    let wt = MatRef::row_major(&inp.w[j0 * d..(j0 + vb) * d], vb, d).t();
    matmul(t, vb, hi, wt, false, par);
}

/// Rows of a tile per task.
const ROWS_PER_TASK: usize = 16;

fn rows_par<F>(par: Par, t: &mut [f32], vb: usize, st: &mut [Tok], f: F)
where
    F: Fn(usize, &mut [f32], &mut [Tok]) + Sync + Send,
{
    let per = ROWS_PER_TASK;
    match par {
        Par::Seq => {
            for (i, (a, b)) in t.chunks_mut(per * vb).zip(st.chunks_mut(per)).enumerate() {
                f(i * per, a, b);
            }
        }
        Par::Rayon => {
            t.par_chunks_mut(per * vb).zip(st.par_chunks_mut(per)).enumerate().for_each(|(i, (a, b))| f(i * per, a, b))
        }
    }
}

fn rows_par_max<F>(par: Par, t: &mut [f32], vb: usize, st: &[Tok], f: F) -> f32
where
    F: Fn(usize, &mut [f32], &[Tok]) -> f32 + Sync + Send,
{
    let per = ROWS_PER_TASK;
    match par {
        Par::Seq => t
            .chunks_mut(per * vb)
            .zip(st.chunks(per))
            .enumerate()
            .map(|(i, (a, b))| f(i * per, a, b))
            .fold(0.0, f32::max),
        Par::Rayon => t
            .par_chunks_mut(per * vb)
            .zip(st.par_chunks(per))
            .enumerate()
            .map(|(i, (a, b))| f(i * per, a, b))
            .reduce(|| 0.0, f32::max),
    }
}

mod tiles;

use tiles::{GradConsts, TileBwd, TileFwd};
