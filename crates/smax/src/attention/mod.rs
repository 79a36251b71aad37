//! Attention: flash attention forward and backward on the CPU, split-K and unified-max
//! decoding, and the attention variants of `ALGORITHMS.md` §3 (A1–A7, N6, N7).
//!
//! ```
//! use smax::attention::{attention, AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, Heads};
//! // Worked example A1 (ALGORITHMS.md): one query, four keys, d = 2.
//! let s = AttentionShape::new(1, 1, 1, 4, 2);
//! let q = [1.0f32, 0.5];
//! let k = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.5];
//! let v = [1.0f32, 2.0, 0.0, 1.0, 3.0, -1.0, 0.5, 0.5];
//! let (mut out, mut lse) = ([0.0f32; 2], [0.0f32; 1]);
//! let inputs = AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v));
//! attention(inputs, AttentionOutputs::new(&mut out, Some(&mut lse)), &AttentionOptions::default())?;
//! assert!((out[0] - 1.585_694_3).abs() < 1e-6 && (lse[0] - 1.935_704_2).abs() < 1e-6);
//! # Ok::<(), smax::Error>(())
//! ```
//!
//! # Shapes and layouts
//!
//! An [`AttentionShape`] names `batch`, `q_heads`, `kv_heads`, `q_len`, `kv_len` and
//! `head_dim`. Queries are `[batch, q_heads, q_len, head_dim]`, keys and values
//! `[batch, kv_heads, kv_len, head_dim]` (grouped-query attention: `q_heads` a multiple of
//! `kv_heads`; query head `h` reads key/value head `h / (q_heads / kv_heads)`). Inputs are
//! [`Heads`] views: a buffer plus [`HeadStrides`] (batch, head and token strides in elements;
//! `head_dim` is always contiguous), so both `[b, h, s, d]` ([`HeadStrides::bhsd`]) and
//! `[b, s, h, d]` ([`HeadStrides::bshd`]) buffers are read in place. Outputs (and gradients)
//! are contiguous `[b, h, s, d]`; the log-sum-exp is contiguous `[batch, q_heads, q_len]`.
//!
//! # Scores and masks
//!
//! Score `s_ij = (q_i·k_j · scale + bias_ij) / τ`, with `scale = 1/sqrt(head_dim)` by default
//! and the TempScale temperature `τ` (A7; 1 by default); with a soft cap `c` (Gemma 2),
//! `q_i·k_j · scale` is replaced by `c·tanh(q_i·k_j · scale / c)` (the crate's SIMD `tanh`,
//! ≤ 4 ULP). Query `i` sits at key position
//! `p_i = i + offset` ([`QueryPositions`]; by default bottom-right aligned,
//! `offset = kv_len − q_len`, so a chunk of new queries attends to a longer cache). Key `j` is
//! *visible* to query `i` when every configured mask allows it:
//!
//! | mask | visible when |
//! |---|---|
//! | `causal` | `j ≤ p_i` |
//! | [`Window`] `{left, right}` | `p_i − left ≤ j ≤ p_i + right` |
//! | [`KeepMask`] | `keep[b, h, i, j]` is true |
//! | [`ScoreBias`] | always (an additive bias of `-inf` acts as a mask) |
//!
//! Masking *sets* the score to `-inf` before the maximum (ALGORITHMS.md §0.1); it never adds a
//! sentinel. So the output and every gradient are independent of whatever keys and values
//! (finite, infinite or NaN) sit at masked positions (`NEEDS.md` guarantee 2): a tile whose
//! keys or values hold a non-finite number is computed on a guarded path that skips the
//! masked products instead of multiplying them by zero.
//!
//! # Special values (the attention column of the crate's table)
//!
//! | input | output row | log-sum-exp | gradients |
//! |---|---|---|---|
//! | every key masked, or `kv_len = 0` | 0 | `-inf` | 0 |
//! | NaN in a visible score (query, key, value or bias) | NaN | NaN | NaN |
//! | `+inf` visible score | NaN (IEEE `inf − inf`) | NaN | NaN |
//!
//! # Threads and determinism
//!
//! The forward splits work over (batch, query head, query block). The backward splits over
//! (batch, key/value head) when there are at least as many such pairs as threads; with fewer
//! it runs two finer passes (dK/dV per key block, then dQ per query block), which sum the same
//! terms in the same order (tested bit for bit), so both give one result. No reduction is ever
//! split across threads, so results are bitwise identical for every thread count, and a row's
//! result does not depend on which other rows or batches share the call.
//!
//! # Accuracy
//!
//! Matrix products run in f32 through the `gemm` crate (f32 accumulation, blocked), the
//! exponential is the crate's SIMD `exp` (≤ 2 ULP), row sums accumulate in f64 across key
//! blocks. Against an f64 reference the tests assert `|o − o_ref| ≤ 1e-5·(1 + max|v|)` and
//! `|lse − lse_ref| ≤ 1e-5·(1 + |lse_ref|)` for scores of magnitude up to 30 and
//! `head_dim ≤ 128`; f16/bf16 inputs are widened exactly and the result is narrowed once
//! (one rounding of the narrow type on top).

// Parallel task lists pair each output chunk with its index; spelling those tuples out is clearer
// than naming them.
#![allow(clippy::type_complexity)]

mod backward;
mod clipped;
mod decode;
mod flash;
mod inline;
mod lssa;
mod scores;
mod tile;

pub(crate) use scores::{Scores, scores};

pub use backward::{AttentionGrads, attention_backward};
pub use clipped::{
    ClippedSoftmax, attention_clipped, attention_clipped_backward, attention_gate, attention_gate_backward,
    gate_bias_init,
};
pub use decode::{
    PartialStates, SplitK, UnifiedDecode, UnifiedFallback, UnifiedMax, UnifiedStats, attention_decode,
    attention_decode_unified, merge_attention_states, profile_unified_max,
};
pub use flash::attention;
pub use inline::{Inline, InlineKernel, InlineLocal, inline_attention, inline_attention_backward};
pub use lssa::{Lssa, LssaStats, attention_lssa, attention_lssa_backward};

use crate::element::Element;
use crate::error::{Error, Result};
use crate::options::{Exec, defaults, setters};

/// Element types attention accepts: `f32`, and [`half::f16`] / [`half::bf16`] widened to f32
/// on load (every product and sum accumulates in f32 or wider) and narrowed once on store.
pub trait AttnElement: Element {}
impl AttnElement for f32 {}
impl AttnElement for half::f16 {}
impl AttnElement for half::bf16 {}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionShape {
    /// Batch size.
    pub batch: usize,
    /// Query heads (a multiple of `kv_heads`).
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Queries per head.
    pub q_len: usize,
    /// Keys (and values) per head.
    pub kv_len: usize,
    /// Head dimension `d` (≥ 1).
    pub head_dim: usize,
}

impl AttentionShape {
    /// Multi-head attention with `heads` query and key/value heads.
    pub fn new(batch: usize, heads: usize, q_len: usize, kv_len: usize, head_dim: usize) -> Self {
        AttentionShape { batch, q_heads: heads, kv_heads: heads, q_len, kv_len, head_dim }
    }

    /// Grouped-query attention: sets the number of key/value heads.
    pub fn kv_heads(mut self, kv_heads: usize) -> Self {
        self.kv_heads = kv_heads;
        self
    }

    /// Elements of the contiguous output `[batch, q_heads, q_len, head_dim]` (saturating at
    /// `usize::MAX` for a shape the calls would refuse with [`Error::SizeOverflow`]).
    pub fn out_len(&self) -> usize {
        self.batch.saturating_mul(self.q_heads).saturating_mul(self.q_len).saturating_mul(self.head_dim)
    }

    /// Elements of the contiguous `[batch, kv_heads, kv_len, head_dim]` (the key and value
    /// gradients; saturating as [`AttentionShape::out_len`]).
    pub fn kv_len_elems(&self) -> usize {
        self.batch.saturating_mul(self.kv_heads).saturating_mul(self.kv_len).saturating_mul(self.head_dim)
    }

    /// Values of the log-sum-exp `[batch, q_heads, q_len]` (saturating as
    /// [`AttentionShape::out_len`]).
    pub fn lse_len(&self) -> usize {
        self.batch.saturating_mul(self.q_heads).saturating_mul(self.q_len)
    }

    /// Query heads per key/value head.
    pub(crate) fn group(&self) -> usize {
        self.q_heads / self.kv_heads.max(1)
    }

    fn describe(&self) -> String {
        format!(
            "batch {} q_heads {} kv_heads {} q_len {} kv_len {} head_dim {}",
            self.batch, self.q_heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim
        )
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.head_dim == 0 {
            return Err(Error::bad_parameter("head_dim", "0", ">= 1"));
        }
        if self.kv_heads == 0 || !self.q_heads.is_multiple_of(self.kv_heads) {
            return Err(Error::Unsupported {
                what: "kv_heads",
                why: "q_heads must be a positive multiple of kv_heads (grouped-query attention)",
            });
        }
        // Per batch too: with `batch = 0` the whole product is 0 whatever the rest, but strides
        // and per-head sizes still multiply heads, tokens and `d`. Lengths count as at least 1
        // so that `batch·heads·d` fits even when both lengths are 0.
        let per_batch = [self.q_heads.max(self.kv_heads), self.q_len.max(self.kv_len).max(1), self.head_dim]
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b));
        let prod = per_batch.and_then(|p| p.checked_mul(self.batch));
        if prod.is_none() || self.q_len.checked_mul(self.kv_len).is_none() {
            return Err(Error::SizeOverflow { what: "attention shape", shape: self.describe() });
        }
        Ok(())
    }
}

/// Element strides of a `[batch, heads, tokens, head_dim]` tensor whose `head_dim` axis is
/// contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HeadStrides {
    /// Between batches.
    pub batch: usize,
    /// Between heads.
    pub head: usize,
    /// Between tokens.
    pub token: usize,
}

impl HeadStrides {
    /// Contiguous `[batch, heads, tokens, d]`. Products that overflow saturate at
    /// `usize::MAX`, which no buffer backs: the call that gets them returns an error.
    pub fn bhsd(heads: usize, tokens: usize, d: usize) -> Self {
        let head = tokens.saturating_mul(d);
        HeadStrides { batch: heads.saturating_mul(head), head, token: d }
    }

    /// Contiguous `[batch, tokens, heads, d]` (the layout a fused QKV projection produces).
    /// Overflowing products saturate, as [`HeadStrides::bhsd`].
    pub fn bshd(heads: usize, tokens: usize, d: usize) -> Self {
        let token = heads.saturating_mul(d);
        HeadStrides { batch: tokens.saturating_mul(token), head: d, token }
    }
}

/// A read-only attention operand: a buffer and its strides (`None`: contiguous
/// `[batch, heads, tokens, head_dim]`).
#[derive(Debug, Clone, Copy)]
pub struct Heads<'a, T> {
    /// The elements.
    pub data: &'a [T],
    /// The strides; `None` for contiguous `[b, h, s, d]`.
    pub strides: Option<HeadStrides>,
}

impl<'a, T> Heads<'a, T> {
    /// A contiguous `[batch, heads, tokens, head_dim]` buffer.
    pub fn new(data: &'a [T]) -> Self {
        Heads { data, strides: None }
    }
    /// A buffer with explicit strides.
    pub fn strided(data: &'a [T], strides: HeadStrides) -> Self {
        Heads { data, strides: Some(strides) }
    }
}

/// A validated operand: strides resolved.
#[derive(Clone, Copy)]
pub(crate) struct Op<'a, T> {
    pub data: &'a [T],
    pub st: HeadStrides,
}

impl<'a, T> Op<'a, T> {
    /// Start of token `t` of head `h` in batch `b`.
    #[inline]
    pub fn at(&self, b: usize, h: usize, t: usize) -> usize {
        b * self.st.batch + h * self.st.head + t * self.st.token
    }
    /// Row `t` of head `(b, h)`, `d` elements.
    #[inline]
    pub fn row(&self, b: usize, h: usize, t: usize, d: usize) -> &'a [T] {
        let o = self.at(b, h, t);
        &self.data[o..o + d]
    }
}

pub(crate) fn resolve<'a, T>(
    what: &'static str,
    x: Heads<'a, T>,
    batch: usize,
    heads: usize,
    tokens: usize,
    d: usize,
) -> Result<Op<'a, T>> {
    let st = x.strides.unwrap_or(HeadStrides::bhsd(heads, tokens, d));
    if batch == 0 || heads == 0 || tokens == 0 {
        return Ok(Op { data: x.data, st });
    }
    if tokens > 1 && st.token < d {
        return Err(Error::StrideTooSmall { what, stride: st.token, len: d });
    }
    let last = (batch - 1)
        .checked_mul(st.batch)
        .and_then(|a| (heads - 1).checked_mul(st.head).and_then(|b| a.checked_add(b)))
        .and_then(|a| (tokens - 1).checked_mul(st.token).and_then(|b| a.checked_add(b)))
        .and_then(|a| a.checked_add(d));
    match last {
        Some(n) if n <= x.data.len() => Ok(Op { data: x.data, st }),
        Some(n) => Err(Error::BufferTooShort { what, len: x.data.len(), needed: n }),
        None => Err(Error::SizeOverflow {
            what,
            shape: format!("batch {batch} heads {heads} tokens {tokens} head_dim {d}"),
        }),
    }
}

/// Where the queries sit among the keys (the causal diagonal and the sliding window are
/// measured from there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueryPositions {
    /// Query `i` at key position `i + kv_len − q_len`: the last query sees the last key
    /// (FlashAttention ≥ 2.1's convention; the right one for a chunk of new tokens attending to
    /// a cache). With `q_len > kv_len` the first `q_len − kv_len` queries see no key under
    /// `causal` and return 0.
    #[default]
    BottomRight,
    /// Query `i` at key position `i + offset` (`offset` may be negative).
    Offset(i64),
}

/// A sliding window: query at position `p` sees keys `p − left ..= p + right`
/// (Mistral's window of `w` tokens is `left = w − 1, right = 0` together with `causal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Keys visible before the query position.
    pub left: usize,
    /// Keys visible after it.
    pub right: usize,
}

/// Element strides of a `[batch, q_heads, q_len, kv_len]` score-shaped tensor whose key axis is
/// contiguous. A stride of 0 broadcasts that axis (a bias shared by all heads has `head: 0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScoreStrides {
    /// Between batches.
    pub batch: usize,
    /// Between query heads.
    pub head: usize,
    /// Between queries.
    pub query: usize,
}

impl ScoreStrides {
    /// Contiguous `[batch, q_heads, q_len, kv_len]`.
    pub fn contiguous(q_heads: usize, q_len: usize, kv_len: usize) -> Self {
        ScoreStrides { batch: q_heads * q_len * kv_len, head: q_len * kv_len, query: kv_len }
    }
    /// One `[q_len, kv_len]` matrix shared by every batch and head.
    pub fn shared(kv_len: usize) -> Self {
        ScoreStrides { batch: 0, head: 0, query: kv_len }
    }
    #[inline]
    pub(crate) fn at(&self, b: usize, h: usize, i: usize) -> usize {
        b * self.batch + h * self.head + i * self.query
    }
}

/// An additive score bias (ALiBi, relative positions, a float mask), f32, added before the
/// temperature: `s = (q·k·scale + bias)/τ`. `-inf` masks; NaN makes the row NaN.
#[derive(Debug, Clone, Copy)]
pub struct ScoreBias<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Their strides.
    pub strides: ScoreStrides,
}

/// A boolean mask: `true` = attend, `false` = masked (PyTorch's SDPA convention).
#[derive(Debug, Clone, Copy)]
pub struct KeepMask<'a> {
    /// The flags.
    pub data: &'a [bool],
    /// Their strides.
    pub strides: ScoreStrides,
}

defaults! {
    /// Tile sizes of the blocked kernels: `q` query rows by `kv` keys per score tile. Working memory
    /// per thread is about `4·(q·kv + 2·q·d + 2·kv·d)` bytes; defaults 128 × 256, chosen by
    /// `smax bench attention`. Each is clamped to at least 1 and at most the query (key) count.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct AttentionTiles {
        /// Query rows per tile.
        pub q: usize = 128,
        /// Keys per tile.
        pub kv: usize = 256,
    }
}

/// Options of the attention calls. `AttentionOptions::default()` is plain non-causal
/// softmax attention with scale `1/sqrt(d)`. `variant` holds the parameters of the variant
/// call that takes them (`()` for [`attention`] and [`attention_backward`]; [`SplitK`] for
/// [`attention_decode`], [`ClippedSoftmax`], [`Lssa`], [`UnifiedDecode`], [`Inline`]); set it
/// with [`AttentionOptions::with_variant`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionOptions<'a, V = ()> {
    /// Multiplies `q·k`; `None` for `1/sqrt(head_dim)`. Must be finite, and without a soft cap
    /// `scale/τ` must be finite in f32 (the scores are `q·k` times that factor).
    pub scale: Option<f32>,
    /// TempScale's τ (A7, Zhou et al. 2024): divides the scores after bias and masks. τ < 1
    /// sharpens attention. Finite and > 0 with `1/τ` finite in f32 (the scores are f32);
    /// default 1.
    pub temperature: f64,
    /// Logit soft cap `c` (Gemma 2): `q·k·scale` becomes `c·tanh(q·k·scale/c)` before the bias
    /// and τ. Finite and > 0 with `c/τ` finite in f32; `None` (default) for none. The backward
    /// includes its derivative.
    pub softcap: Option<f32>,
    /// Causal mask (`j ≤ p_i`).
    pub causal: bool,
    /// Query positions for the causal diagonal and the window.
    pub positions: QueryPositions,
    /// Sliding window.
    pub window: Option<Window>,
    /// Additive bias.
    pub bias: Option<ScoreBias<'a>>,
    /// Boolean mask.
    pub keep: Option<KeepMask<'a>>,
    /// Tile sizes.
    pub tiles: AttentionTiles,
    /// Threads and the SIMD level of the row kernels.
    pub exec: Exec,
    /// The variant's parameters.
    pub variant: V,
}

impl<V: Default> Default for AttentionOptions<'_, V> {
    fn default() -> Self {
        AttentionOptions {
            scale: None,
            temperature: 1.0,
            softcap: None,
            causal: false,
            positions: QueryPositions::BottomRight,
            window: None,
            bias: None,
            keep: None,
            tiles: AttentionTiles::default(),
            exec: Exec::default(),
            variant: V::default(),
        }
    }
}

setters!(AttentionOptions<'a, V> {
    temperature: f64, causal: bool, positions: QueryPositions, tiles: AttentionTiles, variant: V,
} some { scale: f32, softcap: f32, window: Window, bias: ScoreBias<'a>, keep: KeepMask<'a> });

impl<'a> AttentionOptions<'a> {
    /// The same options with a variant's parameters.
    pub fn with_variant<W>(self, variant: W) -> AttentionOptions<'a, W> {
        self.map_variant(variant)
    }
}

impl<V> AttentionOptions<'_, V> {
    /// The keys `lo..hi` that query `i` of `q_len` may attend to among `kv_len` under
    /// `causal`, `window` and `positions`: the rule every kernel applies (a `bias` or `keep`
    /// mask comes on top). An empty range means the query sees no key (its output is 0).
    pub fn visible_keys(&self, q_len: usize, kv_len: usize, i: usize) -> core::ops::Range<usize> {
        let p = scores::position_of(i, scores::query_offset(self.positions, q_len, kv_len));
        let (lo, hi) = scores::key_range(self.causal, self.window, p, kv_len);
        lo..hi
    }
}

impl<V: Copy> AttentionOptions<'_, V> {
    /// The same options when they borrow nothing (no `bias`, no `keep` mask), with any
    /// lifetime: for a caller that stores them (an adapter's op that runs its backward later);
    /// `None` when a bias or mask is set.
    pub fn without_borrows<'b>(&self) -> Option<AttentionOptions<'b, V>> {
        if self.bias.is_some() || self.keep.is_some() {
            return None;
        }
        Some(self.with_parts(None, None, self.variant))
    }
}

impl<'a, V> AttentionOptions<'a, V> {
    /// The options without the variant's parameters (what the shared validation reads).
    pub(crate) fn base(&self) -> AttentionOptions<'a> {
        self.map_variant(())
    }

    fn map_variant<W>(&self, variant: W) -> AttentionOptions<'a, W> {
        self.with_parts(self.bias, self.keep, variant)
    }

    /// These options with another bias, mask and variant.
    fn with_parts<'b, W>(
        &self,
        bias: Option<ScoreBias<'b>>,
        keep: Option<KeepMask<'b>>,
        variant: W,
    ) -> AttentionOptions<'b, W> {
        AttentionOptions {
            scale: self.scale,
            temperature: self.temperature,
            softcap: self.softcap,
            causal: self.causal,
            positions: self.positions,
            window: self.window,
            bias,
            keep,
            tiles: self.tiles,
            exec: self.exec,
            variant,
        }
    }
}

/// The inputs of an attention call: the shape and the three operands.
#[derive(Debug, Clone, Copy)]
pub struct AttentionInputs<'a, T> {
    /// Batch, heads, lengths, head dimension.
    pub shape: AttentionShape,
    /// Queries, `[batch, q_heads, q_len, head_dim]` in any strides.
    pub q: Heads<'a, T>,
    /// Keys, `[batch, kv_heads, kv_len, head_dim]` in any strides.
    pub k: Heads<'a, T>,
    /// Values, shaped as the keys.
    pub v: Heads<'a, T>,
}

impl<'a, T> AttentionInputs<'a, T> {
    /// The shape and the operands.
    pub fn new(shape: AttentionShape, q: Heads<'a, T>, k: Heads<'a, T>, v: Heads<'a, T>) -> Self {
        AttentionInputs { shape, q, k, v }
    }
}

/// The outputs of a forward attention call: `out`, contiguous
/// `[batch, q_heads, q_len, head_dim]`, and optionally the per-row log-sum-exp of the scores,
/// `[batch, q_heads, q_len]`, which the backward passes and
/// [`merge_attention_states`] take.
#[derive(Debug)]
pub struct AttentionOutputs<'a, T> {
    /// The attention output.
    pub out: &'a mut [T],
    /// The per-row log-sum-exp, if wanted.
    pub lse: Option<&'a mut [f32]>,
}

impl<'a, T> AttentionOutputs<'a, T> {
    /// `out` and an optional `lse`.
    pub fn new(out: &'a mut [T], lse: Option<&'a mut [f32]>) -> Self {
        AttentionOutputs { out, lse }
    }
}

/// The caller's log-sum-exp buffer (length-checked), or `own` sized for it when the caller
/// wants none.
pub(crate) fn lse_or_own<'a>(lse: Option<&'a mut [f32]>, own: &'a mut Vec<f32>, n: usize) -> Result<&'a mut [f32]> {
    match lse {
        Some(l) => {
            check_out("lse", l.len(), n)?;
            Ok(l)
        }
        None => {
            own.resize(n, 0.0);
            Ok(&mut own[..])
        }
    }
}

pub(crate) fn check_out(what: &'static str, len: usize, needed: usize) -> Result<()> {
    if len != needed {
        return Err(Error::LengthMismatch { what, len, expected: needed });
    }
    Ok(())
}
