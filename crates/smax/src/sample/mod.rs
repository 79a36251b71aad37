//! Sampling from a softmax: temperature, top-k, top-p (nucleus) and min-p filtering, exactly as
//! a full sort would do them but without sorting the vocabulary, plus Gumbel-max
//! (ALGORITHMS.md D1, D2; NEEDS 17–21).
//!
//! # The definition (what "exactly" means)
//!
//! For one row of logits `z` (NaN or `+inf` anywhere is an error; `-inf` entries are masked and
//! never kept), with `t = (z − max z)/T` (the shift, which changes no probability, comes first
//! so that a tiny `T` sends the other logits to `-inf` rather than the largest to `+inf`):
//!
//! 1. **Order.** Tokens are ranked by `t` descending, ties by index ascending (a total order;
//!    for `T > 0` it is the order of `z` and of the probabilities).
//! 2. **Top-k** (`k ≥ 1`): keep the tokens whose `t` is at least the k-th largest value (ties
//!    at the boundary are all kept, as Hugging Face does, so more than k can survive); with
//!    [`SampleOptions::strict_top_k`], exactly the first k in the order. `k ≥` the number of
//!    unmasked tokens is a no-op.
//! 3. **Top-p** (`0 < p ≤ 1`) on the survivors, *renormalised over them*: with
//!    `p_i = exp(t_i − lse)`, `lse` over the survivors, walk the order and keep token j while the
//!    mass before it is `< p`; the first token is always kept (so is the token that crosses p),
//!    `p = 1` is a no-op. The masses are f64 sums in that order.
//! 4. **Min-p** (`0 ≤ p_base ≤ 1`): keep survivors with `exp(t_i − t_max) ≥ p_base` (the max
//!    always survives).
//! 5. **Renormalise** over the kept set: `lse_kept = m + ln Σ_{kept, index order} exp(t_i − m)`,
//!    `p_i = exp(t_i − lse_kept)` (f64 sums in index order).
//! 6. **Draw** with `u ∈ [0, 1)`: the first kept token (index order) at which the running
//!    `Σ exp(t_i − m)` exceeds `u·Σ`; the last kept token if rounding leaves none.
//!
//! Every step keeps at least one token, so the composition never empties the support. `T = 0`
//! is greedy: the argmax, lowest index on ties. The tests compare the kept sets and
//! probabilities against a plain full-sort implementation of this definition, bit for bit.
//!
//! # Speed
//! **f32 rows with top-k (k ≤ 4096) or min-p without top-p** take two vector passes: one for
//! the max and the row's validity, one that looks inside a block of 64 logits only when its
//! maximum reaches a moving threshold (the k-th largest value seen so far, or the logit below
//! which min-p drops every token). Only those candidates are converted to `t` in f64 and
//! filtered; a check on the bound of every other token's `t` proves that they decide the row
//! (ties across the threshold, or a temperature that merges values, fail it: the row is then
//! redone over every token). Top-p after a top-k sums over the candidates only. On a 2-core
//! Xeon (AVX-512) at V = 131072, one row: top-k(50) and min-p(0.05) take ≈ 0.05 ms.
//!
//! **f32 rows with top-p and no top-k** (4096 tokens or more) take a few vector passes: the max;
//! `exp(t)` in f32 for every token, summed below each of the depths 4, 6, 7.5, 10 and 16 under the
//! max; then the *head*, every token above the shallowest depth that holds more than p of the
//! mass and whose tail sum has a small error bound, is listed and its `t` and `exp(t)` formed
//! in f64 (a vectorised `exp` within 1e-14 of libm). A histogram of the head's mass over 1024
//! slices of `t` locates the slices where the running mass may cross p; only their tokens are
//! sorted and walked. Every comparison with p that decides the cut must hold by more than the
//! proved error of the sums (the tail's f32 error is bounded from the `exp`'s 2 ULP, the
//! roundings of `t` in f32 and of the sums); when one does not, the row's sum is redone in f64
//! and the walk retried, and after a second failure the row takes the f64 path below. The draw
//! uses the same bound against the libm sums. A nucleus deeper than 16 below the max (a very
//! flat row) also takes the f64 path.
//!
//! **Every other row** is converted to `t` in f64. Top-k keeps the k best in a size-k heap in
//! one pass, rejecting most values with one f64 comparison (`select_nth_unstable` beyond
//! 4096); top-p needs `Σ exp(t_i − max t)` over the whole row in f64, then a histogram of that
//! mass by distance below the max (1/16 wide); the tokens down to the bucket where the mass
//! reaches p are collected in one pass and sorted, and the exact walk runs over them (over
//! every survivor, should rounding leave it short). Without a top-k cut the sum comes from the
//! vectorised f64 `exp` (Cody–Waite reduction, degree-12 polynomial: within 1e-14 of libm per
//! token, so the sum is within `1e-13 + 2n·2^-53` of the definition's libm sum in index
//! order); the walk's cut is kept only when each comparison with p that decided it holds by
//! more than that margin, so it is the definition's cut; otherwise (a running sum within
//! ~1e-10 of p) the libm sum is taken and the walk redone. Min-p is one pass. Rows run in
//! parallel.
//!
//! # Randomness
//! A draw needs one uniform per row: given by the caller ([`Draw::Uniform`]), or from the
//! counter-based generator [`counter_uniform`] keyed by a per-row seed and a step
//! ([`Draw::Counter`]), so a row's draw depends only on its logits, parameters, seed and step —
//! not on its batch neighbours or the thread count.

use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{View, ViewMut};
use crate::options::{Exec, defaults, setters};
use crate::par;

defaults! {
    /// Filtering and temperature of [`sample`] and [`process`]. `Default`: T = 1, no filter.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct SampleOptions {
        /// Temperature `T ≥ 0` (0: greedy argmax); negative or non-finite is an error.
        pub temperature: f64 = 1.0,
        /// Top-k (`k ≥ 1`), or none.
        pub top_k: Option<usize> = None,
        /// Keep exactly k (ties broken by index) instead of every token tied with the k-th.
        pub strict_top_k: bool = false,
        /// Top-p in `(0, 1]`, or none.
        pub top_p: Option<f64> = None,
        /// Min-p base in `[0, 1]`, or none.
        pub min_p: Option<f64> = None,
        /// Threads (rows run in parallel) and the SIMD level of the candidate search of f32 rows
        /// (every decision is taken in f64 either way, so the level never changes a result).
        pub exec: Exec = Exec::default(),
    }
}

setters!(SampleOptions { temperature: f64, strict_top_k: bool } some { top_k: usize, top_p: f64, min_p: f64 });

impl SampleOptions {
    fn check(&self) -> Result<()> {
        let bad = |name, v: String, expected| Err(Error::bad_parameter(name, v, expected));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", format!("{}", self.temperature), "finite and >= 0 (0 = greedy)");
        }
        if self.top_k == Some(0) {
            return bad("top_k", "0".into(), ">= 1 (None disables it)");
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top_p", format!("{p}"), "in (0, 1] (None disables it)");
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return bad("min_p", format!("{p}"), "in [0, 1]");
            }
        }
        Ok(())
    }
}

/// Where the uniform numbers of a draw come from.
#[derive(Debug, Clone, Copy)]
pub enum Draw<'a> {
    /// One uniform in `[0, 1)` per row.
    Uniform(&'a [f64]),
    /// [`counter_uniform`]`(seeds[row], step)`: one seed per row (per request).
    Counter {
        /// One seed per row.
        seeds: &'a [u64],
        /// The decoding step.
        step: u64,
    },
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `i`-th 64-bit output of the counter-based generator keyed by `(seed, step)`: two rounds
/// of the SplitMix64 finaliser over the key and the counter (a stateless hash, not
/// cryptographic; passes the uniformity checks of the test suite).
pub fn counter_u64(seed: u64, step: u64, i: u64) -> u64 {
    splitmix(splitmix(seed ^ splitmix(step)) ^ i.wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// A uniform in the open interval `(0, 1)`: `(k + 0.5)/2^53` with `k` the top 53 bits of
/// [`counter_u64`]`(seed, step, 0)` (never 0, never 1, so `ln u` and `ln(1 − u)` are finite).
pub fn counter_uniform(seed: u64, step: u64) -> f64 {
    open_uniform(counter_u64(seed, step, 0))
}

fn open_uniform(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// What a sampling call reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SampleStats {
    /// Rows whose kept set had more than one token.
    pub rows_sampled: usize,
    /// Largest kept-set size over the rows.
    pub max_kept: usize,
}

/// Row preparation: `t = (z − max z)/T` in f64 (`T = 0`: `t = z`, greedy; a max of zeros is
/// `+0`) and the count of its unmasked entries (`t ≠ -inf`); NaN or +inf is an error naming
/// the row and index. The shift comes first so that a small `T` sends the other logits to
/// `-inf`, never the largest to `+inf` (whose softmax would be `inf − inf`); every
/// probability, and the order of the logits, is that of `z/T`.
fn prepare<T: Element>(z: &[T], temp: f64, row: usize) -> Result<(Vec<f64>, usize)> {
    let mut t = Vec::new();
    let unmasked = prepare_into(z, temp, row, &mut t)?;
    Ok((t, unmasked))
}

thread_local! {
    /// [`sample_row`]'s per-thread buffer for a row in f64.
    static SCRATCH: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// [`prepare`] into `t` (resized to the row); returns the unmasked count. Both loops are free
/// of early exits so that they vectorize; an invalid entry is located afterwards.
fn prepare_into<T: Element>(z: &[T], temp: f64, row: usize, t: &mut Vec<f64>) -> Result<usize> {
    t.clear();
    t.resize(z.len(), 0.0);
    let mut m = f64::NEG_INFINITY;
    let mut bad = false;
    for (o, v) in t.iter_mut().zip(z) {
        let v = v.to_f64();
        bad |= v.is_nan() | (v == f64::INFINITY);
        m = if v > m { v } else { m };
        *o = v;
    }
    if bad {
        if let Some((index, &value)) = t.iter().enumerate().find(|(_, v)| v.is_nan() || **v == f64::INFINITY) {
            return Err(Error::NonFiniteLogit { row, index, value });
        }
    }
    if m == f64::NEG_INFINITY {
        return Err(Error::NoValidToken { row });
    }
    let mut masked = 0;
    let m = shift(m);
    if temp > 0.0 {
        // `(z − m)/1` is `z − m` exactly: the same bits without the divisions.
        let unit = temp == 1.0;
        for v in t.iter_mut() {
            *v = if unit { *v - m } else { scaled(*v, m, temp) };
        }
    }
    for v in t.iter() {
        masked += (*v == f64::NEG_INFINITY) as usize;
    }
    Ok(z.len() - masked)
}

/// The shift of a row whose largest logit is `max`: `+0` for a max of zeros, whichever zero
/// the comparison kept (`max` may return either).
#[inline]
fn shift(max: f64) -> f64 {
    max + 0.0
}

/// `t = (z − m)/T` with `m` from [`shift`]: the one formula of both paths (every token in
/// [`prepare`], the candidates in [`candidates`]), so that they give the same `t`, bit for bit.
#[inline]
fn scaled(z: f64, m: f64, temp: f64) -> f64 {
    (z - m) / temp
}

/// The greedy token: argmax, lowest index on ties.
fn argmax<R: Tokens>(row: &R) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (i, v) in row.each() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |b| b.0)
}

/// Greedy decoding of one row: the argmax, with the processed log-probabilities (0 there,
/// `-inf` elsewhere) when asked. Returns `(token, kept count = 1)`.
fn greedy<R: Tokens>(row: &R, lp_out: Option<&mut [f64]>) -> (usize, usize) {
    let a = argmax(row);
    if let Some(o) = lp_out {
        o.fill(f64::NEG_INFINITY);
        o[a] = 0.0;
    }
    (a, 1)
}

/// One row after its kept set: the processed log-probabilities (optional) and the draw
/// (`usize::MAX` without a uniform). Returns `(token, kept count)`.
fn finish<R: Tokens>(row: &R, kept: &Kept, u: Option<f64>, lp_out: Option<&mut [f64]>) -> (usize, usize) {
    let m = kept.t_max;
    // The kept tokens in index order, with exp(t − m): one scan, then only the survivors.
    let list: Vec<(usize, f64, f64)> =
        row.each().filter(|&(i, v)| kept.has(v, i)).map(|(i, v)| (i, v, (v - m).exp())).collect();
    let mut s = 0.0f64;
    for &(_, _, e) in &list {
        s += e;
    }
    let lse = m + s.ln();
    if let Some(o) = lp_out {
        o.fill(f64::NEG_INFINITY);
        for &(i, v, _) in &list {
            o[i] = v - lse;
        }
    }
    let count = list.len();
    let Some(u) = u else { return (usize::MAX, count) };
    let target = u * s;
    let mut acc = 0.0f64;
    for &(i, _, e) in &list {
        acc += e;
        if acc > target {
            return (i, count);
        }
    }
    (list.last().map_or(0, |l| l.0), count)
}

/// One row of `sample`/`process`: from the vector gate's candidates when the row is f32 and
/// they decide it ([`candidates`], [`Kept::separates`]), else from every token in f64.
fn sample_row<T: Element>(
    z: &[T],
    r: usize,
    p: &SampleOptions,
    u: Option<f64>,
    mut lp: Option<&mut [f64]>,
) -> Result<(usize, usize)> {
    if let Some(z32) = T::cast::<f32>(z) {
        if let Some(r) = nucleus::top_p(z32, p, u, lp.as_deref_mut()) {
            return Ok(r);
        }
    }
    if let Some(c) = T::cast::<f32>(z).and_then(|z| candidates(z, p)) {
        if p.temperature == 0.0 {
            return Ok(greedy(&c, lp));
        }
        let kept = filter_row(&c, p);
        if kept.separates(&c, p) {
            return Ok(finish(&c, &kept, u, lp.as_deref_mut()));
        }
    }
    SCRATCH.with(|cell| {
        // The row's f64 copy lives in a per-thread buffer: a fresh one per row would be a
        // fresh mapping (and its page faults) at vocabulary sizes.
        let mut t = cell.take();
        let res = prepare_into(z, p.temperature, r, &mut t).map(|unmasked| {
            let d = Dense::new(&t, unmasked);
            if p.temperature == 0.0 { greedy(&d, lp) } else { finish(&d, &filter_row(&d, p), u, lp) }
        });
        cell.set(t);
        res
    })
}

fn rows_of<T>(v: &View<'_, T>) -> Result<(usize, usize, usize)> {
    v.row_geometry("logits", "sampling takes row layouts (vocabulary along the last axis)")
}

/// Output of [`process`]: probabilities or log-probabilities of the processed distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// `p_i` of the kept set, 0 elsewhere.
    Probs,
    /// `ln p_i` of the kept set, `-inf` elsewhere.
    LogProbs,
}

/// Draws one token per row of `logits` after temperature, top-k, top-p and min-p (the
/// definition in the [module docs](self)), writing the token ids into `tokens` and, when asked,
/// the processed (filtered, renormalised) distribution into `processed` (same shape as the
/// logits; f32 or f64 as `U`).
///
/// Errors: NaN or `+inf` logits ([`Error::NonFiniteLogit`], first in row order), a row with no
/// unmasked token ([`Error::NoValidToken`]), parameters out of range, `tokens` or the draw of
/// the wrong length, an axis layout.
pub fn sample<T: Element, U: Element>(
    logits: View<'_, T>,
    draw: Draw<'_>,
    tokens: &mut [u32],
    processed: Option<(ViewMut<'_, U>, Processed)>,
    p: &SampleOptions,
) -> Result<SampleStats> {
    let (rows, _, _) = rows_of(&logits)?;
    if tokens.len() != rows {
        return Err(Error::RowCountMismatch { what: "tokens", len: tokens.len(), rows });
    }
    let dl = match draw {
        Draw::Uniform(u) => u.len(),
        Draw::Counter { seeds, .. } => seeds.len(),
    };
    if dl != rows {
        return Err(Error::LengthMismatch { what: "draw", len: dl, expected: rows });
    }
    if let Draw::Uniform(u) = draw {
        if let Some(&bad) = u.iter().find(|u| !(**u >= 0.0 && **u < 1.0)) {
            return Err(Error::bad_parameter("uniform", bad, "in [0, 1)"));
        }
    }
    let res = run(logits, p, Some(draw), processed)?;
    let mut st = SampleStats::default();
    for (o, (tok, count)) in tokens.iter_mut().zip(res) {
        *o = tok as u32;
        st.rows_sampled += (count > 1) as usize;
        st.max_kept = st.max_kept.max(count);
    }
    Ok(st)
}

/// The processed distribution alone (no draw): probabilities or log-probabilities of each
/// row after temperature, top-k, top-p and min-p, renormalised over the kept set. Returns the
/// kept-set size per row. Same errors as [`sample`].
pub fn process<T: Element, U: Element>(
    logits: View<'_, T>,
    out: ViewMut<'_, U>,
    what: Processed,
    p: &SampleOptions,
) -> Result<Vec<usize>> {
    let r = run(logits, p, None, Some((out, what)))?;
    Ok(r.into_iter().map(|(_, c)| c).collect())
}

fn run<T: Element, U: Element>(
    logits: View<'_, T>,
    p: &SampleOptions,
    draw: Option<Draw<'_>>,
    processed: Option<(ViewMut<'_, U>, Processed)>,
) -> Result<Vec<(usize, usize)>> {
    p.check()?;
    let (rows, len, xs) = rows_of(&logits)?;
    if len == 0 && rows > 0 {
        return Err(Error::NoValidToken { row: 0 });
    }
    let (pdata, ps, what) = match processed {
        Some((o, w)) => {
            logits.layout.check_same("processed", &o.layout)?;
            let (_, _, s) = o.row_geometry("processed", "takes row layouts")?;
            (Some(o.data), s, w)
        }
        None => (None, 0, Processed::Probs),
    };
    let items: Vec<(usize, usize, Option<&mut [U]>)> = match pdata {
        Some(d) => par::row_groups(d, rows, len, ps).into_iter().map(|(r0, n, g)| (r0, n, Some(g))).collect(),
        None => (0..rows).map(|r| (r, 1, None)).collect(),
    };
    let out: Vec<Result<Vec<(usize, usize)>>> = par::map(p.exec.par, items, |(r0, n, mut o)| {
        let mut res = Vec::with_capacity(n);
        let mut lp = vec![0.0f64; if o.is_some() { len } else { 0 }];
        for i in 0..n {
            let r = r0 + i;
            let u = draw.map(|d| match d {
                Draw::Uniform(u) => u[r],
                Draw::Counter { seeds, step } => counter_uniform(seeds[r], step),
            });
            let lpo = if o.is_some() { Some(&mut lp[..]) } else { None };
            let (tok, count) = sample_row(&logits.data[r * xs..r * xs + len], r, p, u, lpo)?;
            if let Some(o) = o.as_deref_mut() {
                for (d, &v) in o[i * ps..i * ps + len].iter_mut().zip(&lp) {
                    *d = U::from_f64(match what {
                        Processed::Probs => v.exp(),
                        Processed::LogProbs => v,
                    });
                }
            }
            res.push((tok, count));
        }
        Ok(res)
    });
    let mut all = Vec::with_capacity(rows);
    for r in out {
        all.extend(r?);
    }
    Ok(all)
}

/// Where Gumbel-max's uniforms come from.
#[derive(Debug, Clone, Copy)]
pub enum GumbelSource<'a> {
    /// `(k + 0.5)/2^53` with `k` from [`counter_u64`]`(seeds[row], step, i)`.
    Counter {
        /// One seed per row.
        seeds: &'a [u64],
        /// The decoding step.
        step: u64,
    },
    /// One uniform in the open interval `(0, 1)` per logit (`rows x vocabulary`, row-major).
    Uniforms(&'a [f64]),
}

defaults! {
    /// Options of [`gumbel_max`]. `Default`: T = 1, one token per row.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct GumbelOptions {
        /// Temperature `T`, finite and > 0.
        pub temperature: f64 = 1.0,
        /// Tokens drawn per row without replacement, `1 ≤ k ≤` vocabulary.
        pub k: usize = 1,
        /// Threads (rows run in parallel in scalar f64; `exec.simd` has no effect).
        pub exec: Exec = Exec::default(),
    }
}

setters!(GumbelOptions { temperature: f64, k: usize });

/// Gumbel-max sampling (D2): `argmax_i (t_i + g_i)`, `t = (z − max z)/T` as in [`sample`], with `g_i = −ln(−ln u_i)` and `u_i` from
/// `source` (open uniforms, so both logs are finite). This is exactly a sample from
/// `softmax(z/T)` and needs no normalisation, so it works on unnormalised or partial logits;
/// masked (`-inf`) tokens are never chosen. With `k > 1`, the k largest perturbed values give k
/// distinct tokens (sampling without replacement), best first, into `tokens[row·k..]`; an
/// unmasked token whose `t` underflows to `-inf` (a `T` below `(max z − z_i)/f64::MAX`) ranks
/// after every finite key, by index. `T > 0`.
/// Errors as [`sample`], plus uniforms outside `(0, 1)` and rows with fewer than k unmasked
/// tokens.
pub fn gumbel_max<T: Element>(
    logits: View<'_, T>,
    source: GumbelSource<'_>,
    tokens: &mut [u32],
    opts: &GumbelOptions,
) -> Result<()> {
    let GumbelOptions { temperature, k, exec } = *opts;
    let (rows, len, xs) = rows_of(&logits)?;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::bad_parameter("temperature", temperature, "finite and > 0"));
    }
    if k == 0 || k > len.max(1) {
        return Err(Error::bad_parameter("k", k, "in [1, vocabulary]"));
    }
    let (sl, want) = match source {
        GumbelSource::Counter { seeds, .. } => (seeds.len(), rows),
        GumbelSource::Uniforms(u) => (u.len(), rows * len),
    };
    if sl != want {
        return Err(Error::LengthMismatch { what: "gumbel source", len: sl, expected: want });
    }
    if let GumbelSource::Uniforms(u) = source {
        if let Some(&bad) = u.iter().find(|u| !(**u > 0.0 && **u < 1.0)) {
            return Err(Error::bad_parameter("uniform", bad, "in the open interval (0, 1)"));
        }
    }
    if tokens.len() != rows * k {
        return Err(Error::LengthMismatch { what: "tokens", len: tokens.len(), expected: rows * k });
    }
    let items: Vec<usize> = (0..rows).collect();
    let out: Vec<Result<Vec<u32>>> = par::map(exec.par, items, |r| {
        let z = &logits.data[r * xs..r * xs + len];
        let (t, _) = prepare(z, temperature, r)?;
        // Masked means `z = -inf`: an unmasked token whose `t` underflowed to `-inf` (tiny T)
        // still counts, after every finite key.
        let mut keys: Vec<u128> = t
            .iter()
            .enumerate()
            .filter(|(i, _)| z[*i].to_f64() != f64::NEG_INFINITY)
            .map(|(i, &v)| {
                let u = match source {
                    GumbelSource::Counter { seeds, step } => open_uniform(counter_u64(seeds[r], step, i as u64)),
                    GumbelSource::Uniforms(u) => u[r * len + i],
                };
                key(v - (-u.ln()).ln(), i)
            })
            .collect();
        if keys.len() < k {
            return Err(Error::NoValidToken { row: r });
        }
        if k < keys.len() {
            keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        }
        keys[..k].sort_unstable_by(|a, b| b.cmp(a));
        Ok(keys[..k].iter().map(|&kk| key_index(kk) as u32).collect())
    });
    for (r, o) in out.into_iter().enumerate() {
        tokens[r * k..(r + 1) * k].copy_from_slice(&o?);
    }
    Ok(())
}

mod candidates;
mod filter;
mod nucleus;

use candidates::candidates;
use filter::{Dense, Kept, Tokens, filter_row, key, key_index};
