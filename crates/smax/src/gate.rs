//! Mixture-of-experts routing: top-k softmax gates in both orders, the temperature and
//! activation dense-to-sparse gates, a selection-only correction bias, and the load-balancing
//! statistics a router needs (ALGORITHMS.md M1–M3; NEEDS 23).
//!
//! For one token with router logits `h` (NaN or `+inf` is an error; `-inf` masks an expert):
//!
//! 1. **Scores** `s = (a(h) − max a(h))/τ` (the shift changes no weight; it makes a tiny τ send
//!    the other scores to `-inf` rather than the largest to `+inf`), with `a` the [`Activation`] (identity by default; M3's tanh or
//!    sigmoid, applied to the logits as given, i.e. with the bias inside) and τ > 0 the
//!    temperature (M2; 1 by default).
//! 2. **Selection**: the k experts with the largest `sel_i = v_i + c_i`, ties to the larger
//!    activation `a(h_i)` (so that scores that underflowed keep the logits' order), then to the
//!    lower index,
//!    where `v = softmax(s)` for [`GateOrder::SoftmaxThenTopK`] and `v = s` for
//!    [`GateOrder::TopKThenSoftmax`], and `c` the optional correction bias — used for the
//!    selection only, never in the weights (DeepSeek-V3's auxiliary-loss-free balancing).
//! 3. **Weights**: `softmax(s)` of the selected experts (over all experts, then optionally
//!    renormalised over the selected ones), or the softmax over the selected scores only (the
//!    other order); then M2's threshold (drop weights below it, renormalise; the largest is never
//!    dropped), then times `routed_scaling_factor` (independent of the renormalisation).
//!
//! `k ≥` the number of experts gives the dense softmax. Every softmax is max-shifted and summed
//! in f64; weights are written as f32.

use crate::check::try_vec;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{View, ViewMut};
use crate::options::{Exec, defaults, setters};
use crate::par;

/// Which comes first, the softmax or the top-k.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateOrder {
    /// Softmax over every expert, keep the top k (Switch, GShard, Mixtral's reference); with
    /// `renormalize`, the kept weights are divided by their sum.
    SoftmaxThenTopK {
        /// Divide the kept weights by their sum.
        renormalize: bool,
    },
    /// Keep the top k logits, softmax over them (Shazeer et al. 2017's `softmax(TopK(h))`).
    TopKThenSoftmax,
}

/// The activation of M3's gate, applied to the router logits before the temperature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// None (M1, M2).
    #[default]
    Identity,
    /// `tanh` (M3).
    Tanh,
    /// The logistic sigmoid (M3).
    Sigmoid,
}

defaults! {
    /// Parameters of [`gate`]. `Default`: k = 2, softmax then top-k without renormalisation,
    /// τ = 1, no activation, no threshold, scaling 1.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct GateOptions {
        /// Experts per token, `k ≥ 1`.
        pub k: usize = 2,
        /// Softmax / top-k order.
        pub order: GateOrder = GateOrder::SoftmaxThenTopK { renormalize: false },
        /// Temperature τ > 0 (M2: the dense-to-sparse gate divides the router logit by τ; whether
        /// the paper divides the whole affine logit or only its slope is `[UNCONFIRMED]`).
        pub temperature: f64 = 1.0,
        /// Activation before the temperature (M3; its placement is `[UNCONFIRMED]`: applied to the
        /// logits as given, bias inside).
        pub activation: Activation = Activation::Identity,
        /// M2's sparsification: weights below this are dropped and the rest renormalised (the
        /// largest is always kept). `None`: off.
        pub threshold: Option<f64> = None,
        /// Multiplies the final weights (DeepSeek's `routed_scaling_factor`), after any
        /// renormalisation.
        pub routed_scaling_factor: f64 = 1.0,
        /// Threads (token groups run in parallel in scalar f64; `exec.simd` has no effect).
        pub exec: Exec = Exec::default(),
    }
}

setters!(GateOptions { k: usize, order: GateOrder, temperature: f64, activation: Activation, routed_scaling_factor: f64 } some { threshold: f64 });

/// Load-balancing statistics of one [`gate`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct GateStats {
    /// Assignments per expert (each token counts once for each of its k experts, when its
    /// weight is not 0).
    pub tokens_per_expert: Vec<usize>,
    /// Mean router probability per expert, `P_i = mean_tokens softmax(s)_i`.
    pub mean_prob: Vec<f64>,
    /// The Switch Transformer auxiliary loss without its coefficient:
    /// `E · Σ_i f_i·P_i` with `f_i` = assignments of expert i / (tokens·k). 1 when balanced.
    pub aux_loss: f64,
}

fn softmax_into(s: &[f64], out: &mut [f64]) {
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for (o, &v) in out.iter_mut().zip(s) {
        *o = if v == f64::NEG_INFINITY { 0.0 } else { (v - m).exp() };
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// `w ← w / Σw`, for weights proportional to `exp(a_j/τ)` (`a` the chosen experts'
/// activations). When every weight underflowed to 0 (a correction bias can choose experts whose
/// softmax weight is below the smallest f64), the same normalisation in the log domain over the
/// entries `keep` allows: the softmax of `(a_j − max_kept a)/τ`, 0 elsewhere, instead of `0/0`
/// (shifted by the kept entries' own max, so at least one score is 0 whatever τ).
fn renormalize_weights(w: &mut [f64], a: &[f64], tau: f64, keep: impl Fn(usize) -> bool) {
    let t: f64 = w.iter().sum();
    if t > 0.0 {
        w.iter_mut().for_each(|v| *v /= t);
        return;
    }
    softmax_scaled(a, tau, keep, w);
}

/// `out = softmax((a_j − max_kept a)/τ)` over the entries `keep` allows, 0 elsewhere: the
/// weights of those experts, shifted by their own largest activation so that one score is 0
/// whatever τ (their scores relative to every expert may all have underflowed).
/// Written straight into `out` (no scratch: it runs per token for `TopKThenSoftmax`); the
/// largest kept score is 0, so `exp` of the scores needs no further shift.
fn softmax_scaled(a: &[f64], tau: f64, keep: impl Fn(usize) -> bool, out: &mut [f64]) {
    let mk = a.iter().enumerate().filter(|(j, _)| keep(*j)).fold(f64::NEG_INFINITY, |m, (_, &v)| m.max(v));
    let mut sum = 0.0;
    for (j, (o, &v)) in out.iter_mut().zip(a).enumerate() {
        *o = if keep(j) { ((v - mk) / tau).exp() } else { 0.0 };
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// Routes every token (row of `logits`, one column per expert) to `p.k` experts: expert ids
/// into `experts` and their weights into `weights` (both `tokens x k`, best first), returning
/// the load-balancing statistics. `bias` is the optional per-expert correction bias
/// (selection only). When fewer than k experts are unmasked, the extra slots hold masked
/// experts (lowest indices first) with weight 0.
///
/// Errors: NaN or `+inf` logits ([`Error::NonFiniteLogit`]); a token with every expert masked
/// ([`Error::NoValidToken`]); `k = 0` or `k >` experts, τ ≤ 0, a threshold outside `[0, 1]`, a non-finite
/// scaling factor or one above `f32::MAX` in magnitude (the weights are f32), a non-finite
/// bias; buffers of the wrong length; an axis layout.
pub fn gate<T: Element>(
    logits: View<'_, T>,
    bias: Option<&[f32]>,
    experts: &mut [u32],
    weights: &mut [f32],
    p: &GateOptions,
) -> Result<GateStats> {
    let (tokens, e, xs) = logits.row_geometry("logits", "gating takes row layouts (experts along the last axis)")?;
    validate(p, bias, tokens, e, experts.len(), weights.len())?;
    let k = p.k;
    if tokens == 0 {
        return reduce(Vec::new(), 0, e, k);
    }
    // Groups of tokens (fixed by shape, not by thread count), each with reused buffers and
    // its own slices of the outputs; partial statistics merge in group order.
    let per = par::rows_per_task(e);
    let items: Vec<(usize, &mut [u32], &mut [f32])> = experts
        .chunks_mut(per * k)
        .zip(weights.chunks_mut(per * k))
        .enumerate()
        .map(|(g, (x, w))| (g * per, x, w))
        .collect();
    let parts = par::map(p.exec.par, items, |(r0, exg, wg)| {
        let mut sc = Scratch::new(e, k);
        for (j, (exr, wr)) in exg.chunks_mut(k).zip(wg.chunks_mut(k)).enumerate() {
            let r = r0 + j;
            route_token(&logits.data[r * xs..r * xs + e], r, p, bias, &mut sc, exr, wr)?;
        }
        Ok((sc.counts, sc.psum))
    });
    reduce(parts, tokens, e, k)
}

/// The options, the bias and the output lengths against `tokens x e` logits.
fn validate(p: &GateOptions, bias: Option<&[f32]>, tokens: usize, e: usize, n_ex: usize, n_w: usize) -> Result<()> {
    let bad = |name, v: String, expected| Err(Error::bad_parameter(name, v, expected));
    if p.k == 0 || (p.k > e && tokens > 0) {
        return bad("k", format!("{}", p.k), "in [1, experts] (k = experts is the dense softmax)");
    }
    if !(p.temperature.is_finite() && p.temperature > 0.0) {
        return bad("temperature", format!("{}", p.temperature), "finite and > 0");
    }
    if let Some(t) = p.threshold {
        if !(0.0..=1.0).contains(&t) {
            return bad("threshold", format!("{t}"), "in [0, 1]");
        }
    }
    // A weight is at most 1 and is written as f32: the product stays finite in f32.
    if p.routed_scaling_factor.is_nan() || p.routed_scaling_factor.abs() > f32::MAX as f64 {
        return bad("routed_scaling_factor", format!("{}", p.routed_scaling_factor), "finite, |x| <= f32::MAX");
    }
    if let Some(b) = bias {
        if b.len() != e {
            return Err(Error::LengthMismatch { what: "bias", len: b.len(), expected: e });
        }
        if let Some(v) = b.iter().find(|v| !v.is_finite()) {
            return bad("bias", format!("{v}"), "finite");
        }
    }
    let slots = tokens
        .checked_mul(p.k)
        .ok_or_else(|| Error::SizeOverflow { what: "experts", shape: format!("{tokens} tokens x k = {}", p.k) })?;
    for (what, len) in [("experts", n_ex), ("weights", n_w)] {
        if len != slots {
            return Err(Error::LengthMismatch { what, len, expected: slots });
        }
    }
    if e == 0 && tokens > 0 {
        return Err(Error::NoValidToken { row: 0 });
    }
    Ok(())
}

/// One task's buffers (reused across its tokens) and its partial statistics.
struct Scratch {
    counts: Vec<usize>,
    psum: Vec<f64>,
    act: Vec<f64>,
    s: Vec<f64>,
    prob: Vec<f64>,
    idx: Vec<usize>,
    w: Vec<f64>,
    sk: Vec<f64>,
}

impl Scratch {
    fn new(e: usize, k: usize) -> Self {
        Scratch {
            counts: vec![0; e],
            psum: vec![0.0; e],
            act: vec![0.0; e],
            s: vec![0.0; e],
            prob: vec![0.0; e],
            idx: Vec::with_capacity(e),
            w: vec![0.0; k],
            sk: vec![0.0; k],
        }
    }
}

/// Routes token `r` (logits `h`): its experts into `exr`, its weights into `wr`, its
/// assignments and probabilities into the task's statistics.
fn route_token<T: Element>(
    h: &[T],
    r: usize,
    p: &GateOptions,
    bias: Option<&[f32]>,
    sc: &mut Scratch,
    exr: &mut [u32],
    wr: &mut [f32],
) -> Result<()> {
    let (e, k) = (h.len(), p.k);
    let Scratch { counts, psum, act, s, prob, idx, w, sk } = sc;
    for (i, v) in h.iter().enumerate() {
        let v = v.to_f64();
        if v.is_nan() || v == f64::INFINITY {
            return Err(Error::NonFiniteLogit { row: r, index: i, value: v });
        }
        let a = match p.activation {
            _ if v == f64::NEG_INFINITY => v,
            Activation::Identity => v,
            Activation::Tanh => v.tanh(),
            Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        };
        act[i] = a;
    }
    let m = act.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    if m == f64::NEG_INFINITY {
        return Err(Error::NoValidToken { row: r });
    }
    // The temperature divides `a − max a`, which is ≤ 0: a small τ sends the other scores to
    // `-inf` (their weights to 0), never the top one to `+inf` (a softmax of `inf − inf`).
    // Softmax weights do not change under the shift.
    for (o, &a) in s.iter_mut().zip(act.iter()) {
        *o = (a - m) / p.temperature;
    }
    softmax_into(s, prob);
    let base: &[f64] = match p.order {
        GateOrder::SoftmaxThenTopK { .. } => prob,
        GateOrder::TopKThenSoftmax => s,
    };
    // Masked experts (activation `-inf`) are never preferred to unmasked ones, whatever their
    // bias, even those whose score or weight underflowed.
    let sel = |i: usize| {
        if act[i] == f64::NEG_INFINITY { f64::NEG_INFINITY } else { base[i] + bias.map_or(0.0, |b| b[i] as f64) }
    };
    // Largest selection score first; ties to the larger activation (scores that underflowed
    // keep the order of the logits), then to the lower index.
    let cmp = |a: &usize, b: &usize| {
        let (x, y) = (sel(*a), sel(*b));
        let by = |x: f64, y: f64| y.partial_cmp(&x).unwrap_or(core::cmp::Ordering::Equal);
        by(x, y).then(by(act[*a], act[*b])).then(a.cmp(b))
    };
    idx.clear();
    idx.extend(0..e);
    if k < e {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    let chosen = &mut idx[..k];
    chosen.sort_unstable_by(cmp);
    // The chosen experts' activations: every weight below is proportional to `exp(a/τ)`.
    for (o, &i) in sk.iter_mut().zip(chosen.iter()) {
        *o = act[i];
    }
    match p.order {
        GateOrder::SoftmaxThenTopK { renormalize } => {
            for (o, &i) in w.iter_mut().zip(chosen.iter()) {
                *o = prob[i];
            }
            if renormalize {
                renormalize_weights(w, sk, p.temperature, |_| true);
            }
        }
        GateOrder::TopKThenSoftmax => softmax_scaled(sk, p.temperature, |_| true, w),
    }
    if let Some(th) = p.threshold {
        // The largest weight (first of equals) is never dropped: never route to nothing.
        let amax = (0..k).fold(0, |a, j| if w[j] > w[a] { j } else { a });
        for (j, v) in w.iter_mut().enumerate() {
            if *v < th && j != amax {
                *v = 0.0;
            }
        }
        // Σw = 0 only when every weight underflowed: then all were below a positive threshold.
        renormalize_weights(w, sk, p.temperature, |j| j == amax || th <= 0.0);
    }
    for j in 0..k {
        exr[j] = chosen[j] as u32;
        wr[j] = (w[j] * p.routed_scaling_factor) as f32;
        if wr[j] != 0.0 {
            counts[chosen[j]] += 1;
        }
    }
    for (a, b) in psum.iter_mut().zip(prob.iter()) {
        *a += b;
    }
    Ok(())
}

/// What [`gate_backward`] returns besides the logits' gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GateGrads {
    /// `∂L/∂τ` summed over the tokens (M2's learnable temperature).
    pub temperature: f64,
}

/// The backward pass of [`gate`] (ALGORITHMS.md M1–M3): from the upstream gradient `dweights`
/// of the weights `gate` returned (`tokens x k`, best first), the gradient of the router
/// logits into `dlogits` (the logits' shape) and `∂L/∂τ`. The routing is recomputed from
/// `logits`, `bias` and `p` (so it is the forward's own); the selection and the threshold are
/// piecewise constant and pass no gradient. With `s = a(h)/τ` and the kept experts `K`
/// (chosen, and not dropped by the threshold):
///
/// - softmax then top-k without renormalisation and no threshold: the weights are
///   `ρ·softmax(s)_j`, so `∂L/∂s_i = y_i(ḡ_i − Σ_j ḡ_j y_j)` with `y = softmax(s)` over every
///   expert and `ḡ_i = ρ·dweights` at the kept experts, 0 elsewhere;
/// - otherwise (renormalised, top-k then softmax, or a threshold): the weights are
///   `ρ·softmax(s_K)`, the same formula with `y` the softmax over `K` and 0 outside it;
///
/// then `∂L/∂h_i = a'(h_i)·∂L/∂s_i/τ` (`a'` = 1, `1 − tanh²`, `σ(1 − σ)`; 0 at a masked
/// expert) and `∂L/∂τ = −(1/τ)·Σ_i s_i·∂L/∂s_i` (M2: `−Σ ḡ_i g_i (h_i − Σ g_j h_j)/τ²`).
/// `ρ` is `routed_scaling_factor`. Computed in f64 per token (the softmax over `K` in the log
/// domain, so weights that underflowed still get their gradient); tested against finite
/// differences of an f64 forward.
///
/// Errors: those of [`gate`], and `dweights` or `dlogits` of the wrong size.
pub fn gate_backward<T: Element>(
    logits: View<'_, T>,
    bias: Option<&[f32]>,
    dweights: &[f32],
    dlogits: ViewMut<'_, T>,
    p: &GateOptions,
) -> Result<GateGrads> {
    let (tokens, e, xs) = logits.row_geometry("logits", "gating takes row layouts (experts along the last axis)")?;
    validate(p, bias, tokens, e, dweights.len(), dweights.len())?;
    let (dt, de, ds) =
        dlogits.layout.row_geometry("dlogits", "gating takes row layouts (experts along the last axis)")?;
    if (dt, de) != (tokens, e) {
        return Err(Error::ShapeMismatch {
            what: "dlogits",
            got: dlogits.layout.describe(),
            expected: logits.layout.describe(),
        });
    }
    let k = p.k;
    if tokens == 0 {
        return Ok(GateGrads { temperature: 0.0 });
    }
    let tau = p.temperature;
    let renorm = p.threshold.is_some() || !matches!(p.order, GateOrder::SoftmaxThenTopK { renormalize: false });
    let per = par::rows_per_task(e);
    let rows: Vec<(usize, &mut [T])> =
        dlogits.data.chunks_mut((per * ds).max(1)).enumerate().map(|(g, c)| (g * per, c)).collect();
    let parts = par::map(p.exec.par, rows, |(r0, out)| {
        let mut sc = Scratch::new(e, k);
        let (mut exr, mut wr) = (vec![0u32; k], vec![0.0f32; k]);
        let (mut gbar, mut y, mut keep) = (vec![0.0f64; e], vec![0.0f64; e], vec![false; e]);
        let mut dtau = 0.0;
        for r in r0..(r0 + per).min(tokens) {
            let h = &logits.data[r * xs..r * xs + e];
            route_token(h, r, p, bias, &mut sc, &mut exr, &mut wr)?;
            gbar.fill(0.0);
            keep.fill(false);
            for j in 0..k {
                let i = exr[j] as usize;
                if sc.w[j] != 0.0 {
                    keep[i] = true;
                    gbar[i] = p.routed_scaling_factor * dweights[r * k + j] as f64;
                }
            }
            if renorm {
                // softmax over K, in the log domain.
                let mk = (0..e).filter(|&i| keep[i]).fold(f64::NEG_INFINITY, |m, i| m.max(sc.s[i]));
                let mut z = 0.0;
                for i in 0..e {
                    y[i] = if keep[i] { (sc.s[i] - mk).exp() } else { 0.0 };
                    z += y[i];
                }
                y.iter_mut().for_each(|v| *v /= z);
            } else {
                y.copy_from_slice(&sc.prob);
            }
            let dot: f64 = (0..e).map(|i| gbar[i] * y[i]).sum();
            let row = &mut out[(r - r0) * ds..(r - r0) * ds + e];
            for i in 0..e {
                let gs = if y[i] == 0.0 { 0.0 } else { y[i] * (gbar[i] - dot) };
                if gs != 0.0 {
                    dtau -= sc.s[i] * gs / tau;
                }
                let a = sc.act[i];
                let da = match p.activation {
                    _ if a == f64::NEG_INFINITY => 0.0,
                    Activation::Identity => 1.0,
                    Activation::Tanh => 1.0 - a * a,
                    Activation::Sigmoid => a * (1.0 - a),
                };
                row[i] = T::from_f64(da * gs / tau);
            }
        }
        Ok(dtau)
    });
    let mut temperature = 0.0;
    for part in parts {
        temperature += part?;
    }
    Ok(GateGrads { temperature })
}

/// Merges the tasks' statistics in task order into [`GateStats`].
fn reduce(parts: Vec<Result<(Vec<usize>, Vec<f64>)>>, tokens: usize, e: usize, k: usize) -> Result<GateStats> {
    // Per-expert outputs: `e` comes from the caller's layout (rows of any length are valid
    // with no tokens), so they are allocated fallibly.
    let mut stats = GateStats {
        tokens_per_expert: try_vec("gate statistics", e, 0)?,
        mean_prob: try_vec("gate statistics", e, 0.0)?,
        aux_loss: 0.0,
    };
    for part in parts {
        let (c, ps) = part?;
        for (a, b) in stats.tokens_per_expert.iter_mut().zip(c) {
            *a += b;
        }
        for (a, b) in stats.mean_prob.iter_mut().zip(ps) {
            *a += b;
        }
    }
    if tokens > 0 {
        stats.mean_prob.iter_mut().for_each(|m| *m /= tokens as f64);
        let assigned = (tokens * k) as f64;
        stats.aux_loss = e as f64
            * stats
                .tokens_per_expert
                .iter()
                .zip(&stats.mean_prob)
                .map(|(&c, &pm)| c as f64 / assigned * pm)
                .sum::<f64>();
    }
    Ok(stats)
}
