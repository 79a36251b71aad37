//! Losses of the softmax family, each returning its value and its gradient in one call.
//!
//! | function | what | spec |
//! |---|---|---|
//! | [`cross_entropy`] | fused softmax cross-entropy over given logits: PyTorch's reduction, `ignore_index`, class weights, label smoothing, probability targets; PaLM z-loss, soft cap, temperature; SIMD, at memory speed | L1, L2 |
//! | [`linear_cross_entropy`] | the same over `h·Wᵀ + b` without the `N x V` logits (Cut Cross-Entropy), gradients for `h`, `W`, `b` | L9 |
//! | [`linear_cross_entropy_sharded`] | the same over one vocabulary shard of `W`, the shards' per-token statistics combined through a caller's hook (vocabulary parallelism) | L9 |
//! | [`stablemax`], [`stablemax_cross_entropy`], [`softmax_collapse_fraction`], [`orthogonal_gradient`] | StableMax and its loss; the Softmax-Collapse diagnostic; ⊥Grad | N5, N5b, N5c |
//! | [`spherical_z_loss`] | de Brébisson & Vincent's Z-loss (caller sets `a`, `b`) | L3 |
//! | [`comp_sum_loss`] | the comp-sum τ-family: sum-exponential, CE, GCE, MAE | L5 |
//! | [`nkd_loss`], [`uskd_loss`], [`hinton_kd_loss`] | normalised, teacher-free and classic knowledge distillation | L6, L6b, L11 |
//! | [`decoupled_softmax_loss`] | DEXML's multi-positive loss | L7 |
//! | [`normalized_softmax_loss`], [`novel_class_prototype`] | cosine softmax and its novel-class prototypes | L8 |
//! | [`tempnet_loss`] | TempNet's DRO loss with a per-sample temperature, with `∂L/∂τ` | L10 |
//!
//! `cross_entropy` and `linear_cross_entropy` run the SIMD kernels; the others compute in f64
//! per row (see [`LossOptions`]). Entries the spec marks `[MEMORY]`, `[SECONDARY]` or `[UNCONFIRMED]`
//! say so in their docs.
//!
//! # Conventions (ALGORITHMS.md §0.1, §2)
//! * The logits a loss sees are `t = x/τ`, or with a soft cap `c`, `t = c·tanh(x/c)/τ`
//!   (the cap first, then the temperature). The cap keeps `-inf` as `-inf`, so a masked class
//!   stays masked (plain `c·tanh` would turn it into `-c`); `+inf` becomes `c/τ` (its limit).
//! * Every per-row statistic is computed in f64 from f32 block sums (f64 logits: in f64), and
//!   the loss is `lse − ⟨q, t⟩` (never the log of a probability).
//! * A row containing NaN (or `+inf` without a cap) has a NaN loss and a NaN gradient; a row
//!   whose logits are all `-inf` has loss `+inf` and a zero gradient; a target class at a `-inf`
//!   logit gives `+inf` (and a finite gradient: `p − onehot`).
//! * Sums over rows run in row order, whatever the thread count: results are bitwise identical
//!   for every pool size.

mod ce;
mod family;
mod linear;

pub use family::{
    CompSum, CosineGrads, Decoupled, HintonKd, LossOptions, Nkd, NormalizedSoftmax, OrthoGradOptions, SphericalZ,
    StablemaxOptions, StablemaxOutput, TempNet, UskdOptions, UskdRanking, UskdReport, comp_sum_loss,
    decoupled_softmax_loss, hinton_kd_loss, nkd_loss, normalized_softmax_loss, novel_class_prototype,
    orthogonal_gradient, softmax_collapse_fraction, spherical_z_loss, stablemax, stablemax_cross_entropy, tempnet_loss,
    uskd_loss,
};

pub use linear::{
    LinearCeScratch, LinearCrossEntropyOptions, LinearGrads, LinearInputs, LinearShape, LinearTiles, ShardRow,
    VocabShard, linear_cross_entropy, linear_cross_entropy_scratch_bytes, linear_cross_entropy_sharded,
};

use crate::arch::SimdLevel;
use crate::arch::dispatch;
use crate::arch::rows::Xform;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{View, ViewMut};
use crate::options::{Exec, defaults, setters};
use crate::par;

/// How per-row losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// No reduction: per-row values go to [`RowOutputs::loss`]; the returned scalar is their
    /// sum and the gradient is the gradient of that sum.
    None,
    /// The sum over rows.
    Sum,
    /// PyTorch's mean: the sum divided by the number of non-ignored rows, or with class weights
    /// by `Σ_i w[y_i]` over non-ignored rows; probability targets divide by the row count.
    #[default]
    Mean,
}

/// What a mean over zero non-ignored rows returns (PyTorch gives NaN, from 0/0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AllIgnored {
    /// Loss 0 and a zero gradient; [`LossReport::valid_rows`] is 0, which says why.
    #[default]
    Zero,
    /// NaN loss (PyTorch's answer); the gradient is still zero.
    Nan,
}

/// The targets of a cross-entropy.
#[derive(Debug, Clone, Copy)]
pub enum Targets<'a, T> {
    /// One class index per row, in `[0, classes)` or equal to the ignore index.
    Classes(&'a [i64]),
    /// A probability vector per row (same shape as the logits; strides may differ). Rows need
    /// not sum to 1: the loss is `Σ_k u_k·(lse − t_k)` for `u = (1 − ε)·q + ε/K` (times the
    /// class weights), and a class with `u_k = 0` contributes 0 even at a `-inf` logit.
    Probs(View<'a, T>),
}

defaults! {
    /// Options of [`cross_entropy`]. `Default` is PyTorch's `cross_entropy` default: mean
    /// reduction, ignore index −100, no weights, no smoothing, no z-loss, no cap, τ = 1.
    #[derive(Debug, Clone, Copy)]
    pub struct CrossEntropyOptions<'w> {
        /// How rows combine.
        pub reduction: Reduction = Reduction::Mean,
        /// Rows whose target equals this contribute 0 and get a zero gradient (default −100).
        pub ignore_index: i64 = -100,
        /// One weight per class (finite, ≥ 0), PyTorch's `weight`.
        pub class_weights: Option<&'w [f32]> = None,
        /// Label smoothing ε in `[0, 1]` (PyTorch's form: the ε mass spreads over all K classes).
        pub label_smoothing: f64 = 0.0,
        /// PaLM z-loss coefficient λ ≥ 0 (PaLM uses 1e-4): adds `λ·lse²` per non-ignored row,
        /// reported separately in [`LossReport::z_loss`] and included in the gradient.
        pub z_loss: f64 = 0.0,
        /// Logit soft cap `c > 0`: logits become `c·tanh(x/c)` (Gemma 2 uses 30 for the output).
        pub softcap: Option<f64> = None,
        /// Temperature τ > 0: logits are divided by τ after the cap.
        pub temperature: f64 = 1.0,
        /// Upstream gradient of the returned loss (1 by default); multiplies the whole gradient.
        pub grad_scale: f64 = 1.0,
        /// The mean over zero valid rows.
        pub all_ignored: AllIgnored = AllIgnored::Zero,
        /// Threads and SIMD level.
        pub exec: Exec = Exec::default(),
    }
}

setters!(CrossEntropyOptions<'w> {
    reduction: Reduction, ignore_index: i64, label_smoothing: f64, z_loss: f64,
    temperature: f64, grad_scale: f64, all_ignored: AllIgnored,
} some { class_weights: &'w [f32], softcap: f64 });

impl CrossEntropyOptions<'_> {
    /// The same options without class weights, which are the one borrowed field: for a caller
    /// that keeps them itself (an adapter's op that outlives the caller's slice) and sets
    /// `class_weights` again just before the call.
    pub fn without_class_weights(&self) -> CrossEntropyOptions<'static> {
        CrossEntropyOptions {
            reduction: self.reduction,
            ignore_index: self.ignore_index,
            class_weights: None,
            label_smoothing: self.label_smoothing,
            z_loss: self.z_loss,
            softcap: self.softcap,
            temperature: self.temperature,
            grad_scale: self.grad_scale,
            all_ignored: self.all_ignored,
            exec: self.exec,
        }
    }

    /// `f32_compute`: the logits are computed in f32 (every element type but f64).
    fn check(&self, f32_compute: bool) -> Result<()> {
        let bad = |name, value: f64, expected| Err(Error::bad_parameter(name, value, expected));
        crate::check::inv_temperature(self.temperature, f32_compute)?;
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return bad("label_smoothing", self.label_smoothing, "in [0, 1]");
        }
        if !(self.z_loss.is_finite() && self.z_loss >= 0.0) {
            return bad("z_loss", self.z_loss, "finite and >= 0");
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0 && (c as f32).is_normal()) {
                return bad("softcap", c, "finite and > 0");
            }
        }
        if !self.grad_scale.is_finite() {
            return bad("grad_scale", self.grad_scale, "finite");
        }
        if let Some(w) = self.class_weights {
            if let Some(&v) = w.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return bad("class_weights", v as f64, "finite and >= 0");
            }
        }
        Ok(())
    }
}

/// Optional per-row outputs of [`cross_entropy`] (each as long as the row count).
#[derive(Debug, Default)]
pub struct RowOutputs<'a> {
    /// Per-row loss, unreduced (weighted, smoothed; 0 for ignored rows).
    pub loss: Option<&'a mut [f64]>,
    /// Per-row z-loss `λ·lse²` (0 for ignored rows).
    pub z_loss: Option<&'a mut [f64]>,
    /// Per-row log-sum-exp of the transformed logits `t`, for reuse (ignored rows included).
    pub lse: Option<&'a mut [f64]>,
}

/// The reduced result of a loss call: [`cross_entropy`], [`linear_cross_entropy`] and the
/// losses of the family module all return it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossReport {
    /// The reduced main loss (without the z-loss).
    pub loss: f64,
    /// The reduced z-loss (`λ·lse²` per non-ignored row; the mean divides by the number of
    /// non-ignored rows, without class weights). The gradient includes it. 0 for losses
    /// without a z-loss term.
    pub z_loss: f64,
    /// Rows that counted (target not the ignore index; for the multi-positive loss, rows with
    /// at least one positive).
    pub valid_rows: usize,
    /// What the mean divided by (`Σ w[y_i]`, the valid-row count, or the row count; 1 for the
    /// other reductions).
    pub denominator: f64,
    /// Rows the loss's documentation flags (spherical Z-loss: σ = 0; NKD: a teacher with no
    /// finite non-target logit; 0 otherwise).
    pub flagged_rows: usize,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RowOut {
    pub loss: f64,
    pub z: f64,
    pub lse: f64,
}

/// Fused softmax cross-entropy over `logits` (rows = samples, row length = classes K),
/// returning the reduced loss and, when `grad` is given, writing `∂loss/∂logits` into it in
/// the same call (no second pass over the logits after the loss: each row is read once from
/// memory and finished while it is in cache).
///
/// Per row, with `t` the transformed logits (see the [module docs](self)), target mass
/// `u = w_y(1 − ε)·onehot(y) + ε·w/K` (hard targets) or `u = w ⊙ ((1 − ε)q + ε/K)` (soft):
///
/// * loss `ℓ = Σ_k u_k·(lse(t) − t_k)`; z-loss `λ·lse(t)²`;
/// * gradient `∂/∂t_k = s·(U·p_k − u_k) + s_z·2λ·lse·p_k` with `p = softmax(t)`, `U = Σ u`,
///   `s`, `s_z` the reduction scales times [`CrossEntropyOptions::grad_scale`]; then the chain rule
///   through the temperature and the cap (`∂t/∂x = (1 − tanh²(x/c))/τ`).
///
/// Accuracy (f32): `lse` as the core's [`logsumexp`](crate::logsumexp); the loss within a few
/// f32 roundings of `lse` and `t_y`; gradient entries `p_k` to a few ULP, `p_y − 1` to an
/// absolute 2⁻²³; with a cap, the chain factor `1 − tanh²` is formed from the capped value
/// and carries a relative error of a few `2⁻²⁴/(1 − tanh²)`. The test suite asserts all of
/// this against an f64 reference for every option combination (5e-7 of each term's size).
///
/// Algorithm: three passes per row (max; `Σ exp` with the exponentials stored in the gradient
/// row; finish in cache). With plain f32 logits, class targets, no smoothing or cap and a
/// gradient of at least 32 MiB, rows of 1–64 Ki run this as a software pipeline (the
/// exponentials go to a cached scratch row, the gradient streams out of it while the next
/// row's max is taken in the same loop; bit for bit the same row). Rows longer than 64 Ki of
/// plain f32 logits with class targets, no smoothing and a gradient take the core's pipelined online algorithm instead (the gradient
/// write of one row carries the (max, Σ) pass of the next; the gradient streams out); the
/// choice depends on the options and the row length only, so a row's bits never depend on the
/// other rows of the call, and the bounds above hold for both.
///
/// Errors: an axis layout other than `inner = 1` ([`Error::Unsupported`]); rows of length 0
/// ([`Error::BadParameter`]: no classes); targets of the wrong length or out of range; weights
/// of the wrong length; a gradient or probability view of another shape; a row output of the
/// wrong length; parameters out of range.
pub fn cross_entropy<T: Element>(
    logits: View<'_, T>,
    targets: Targets<'_, T>,
    grad: Option<ViewMut<'_, T>>,
    rows_out: RowOutputs<'_>,
    opts: &CrossEntropyOptions<'_>,
) -> Result<LossReport> {
    // Through the instance compiled in this crate (see `crate::element::per_type`).
    (crate::element::per_type::<CeKernel<T>>([&CE_F32, &CE_F64, &CE_F16, &CE_BF16]).0)(
        (logits, targets, grad, rows_out),
        opts,
    )
}

/// The operands of a [`cross_entropy`] call, as its instance table passes them.
type CeOperands<'a, T> = (View<'a, T>, Targets<'a, T>, Option<ViewMut<'a, T>>, RowOutputs<'a>);

/// [`cross_entropy_impl`] instantiated for one element type.
struct CeKernel<T: 'static>(fn(CeOperands<'_, T>, &CrossEntropyOptions<'_>) -> Result<LossReport>);

static CE_F32: CeKernel<f32> = CeKernel(cross_entropy_impl::<f32>);
static CE_F64: CeKernel<f64> = CeKernel(cross_entropy_impl::<f64>);
static CE_F16: CeKernel<half::f16> = CeKernel(cross_entropy_impl::<half::f16>);
static CE_BF16: CeKernel<half::bf16> = CeKernel(cross_entropy_impl::<half::bf16>);

/// The body of [`cross_entropy`], instantiated once per element type in this crate.
pub(crate) fn cross_entropy_impl<T: Element>(
    (logits, targets, grad, rows_out): CeOperands<'_, T>,
    opts: &CrossEntropyOptions<'_>,
) -> Result<LossReport> {
    let v = validate(&logits, targets, grad, &rows_out, opts)?;
    let plan = plan(&v, rows_out.lse.is_some(), opts);
    let results = run(&logits, v, &plan, opts);
    Ok(reduce(&results, rows_out, &plan, opts))
}

/// What [`validate`] checked: the geometry and the borrowed targets and gradient.
struct Checked<'a, T> {
    rows: usize,
    len: usize,
    xs: usize,
    classes: Option<&'a [i64]>,
    probs: Option<(&'a [T], usize)>,
    grad: Option<(&'a mut [T], usize)>,
}

fn validate<'a, T: Element>(
    x: &View<'_, T>,
    targets: Targets<'a, T>,
    grad: Option<ViewMut<'a, T>>,
    rows_out: &RowOutputs<'_>,
    opts: &CrossEntropyOptions<'_>,
) -> Result<Checked<'a, T>> {
    opts.check(T::REPR != crate::element::Repr::F64)?;
    let (rows, len, xs) = x.row_geometry(
        "logits",
        "cross-entropy takes row layouts (classes along the last axis, or an axis layout with inner = 1)",
    )?;
    if len == 0 && rows > 0 {
        return Err(Error::bad_parameter("classes", "0", "at least one class per row"));
    }
    if let Some(w) = opts.class_weights {
        if w.len() != len {
            return Err(Error::LengthMismatch { what: "class_weights", len: w.len(), expected: len });
        }
    }
    let (classes, probs) = match targets {
        Targets::Classes(c) => {
            crate::check::targets(c, rows, len, Some(opts.ignore_index))?;
            (Some(c), None)
        }
        Targets::Probs(q) => {
            x.layout.check_same("targets", &q.layout)?;
            let (_, _, qs) = q.row_geometry("targets", "probability targets take row layouts")?;
            (None, Some((q.data, qs)))
        }
    };
    let grad = match grad {
        Some(g) => {
            x.layout.check_same("grad", &g.layout)?;
            let (_, _, gs) = g.row_geometry("grad", "the gradient takes row layouts")?;
            Some((g.data, gs))
        }
        None => None,
    };
    for (what, b) in [("loss", &rows_out.loss), ("z_loss", &rows_out.z_loss), ("lse", &rows_out.lse)] {
        if let Some(b) = b {
            if b.len() != rows {
                return Err(Error::RowCountMismatch { what, len: b.len(), rows });
            }
        }
    }
    Ok(Checked { rows, len, xs, classes, probs, grad })
}

/// The reduction's denominators and the row kernel's constants.
struct Plan<'w> {
    valid_rows: usize,
    denominator: f64,
    z_den: f64,
    c: ce::Ce<'w>,
}

fn plan<'w, T>(v: &Checked<'_, T>, need_lse: bool, opts: &CrossEntropyOptions<'w>) -> Plan<'w> {
    let stream = v.grad.as_ref().is_some_and(|g| core::mem::size_of_val(&*g.0) >= crate::engine::STREAM_MIN_BYTES);
    let mut p = plan_for(v.classes, v.rows, v.len, opts);
    p.c.row_stride = v.xs.max(1);
    p.c.need_lse = need_lse;
    p.c.stream = stream;
    p
}

/// The reduction's denominators (row order, f64) and the row kernel's constants over
/// `classes` classes, for class targets `targets` (or `rows` probability rows); the row
/// stride, `need_lse` and `stream` are left for the caller to set.
fn plan_for<'w>(targets: Option<&[i64]>, rows: usize, classes: usize, opts: &CrossEntropyOptions<'w>) -> Plan<'w> {
    let valid_rows = match targets {
        Some(c) => c.iter().filter(|&&t| t != opts.ignore_index).count(),
        None => rows,
    };
    let mean_den = match (targets, opts.class_weights) {
        // (Targets and the weights' length were validated before the plan.)
        (Some(c), Some(w)) => c.iter().filter(|&&t| t != opts.ignore_index).map(|&t| w[t as usize] as f64).sum::<f64>(),
        _ => valid_rows as f64,
    };
    let (denominator, z_den) = match opts.reduction {
        Reduction::Mean => (mean_den, valid_rows as f64),
        _ => (1.0, 1.0),
    };
    let scale = |den: f64| if den > 0.0 { opts.grad_scale / den } else { 0.0 };
    let wsum = opts.class_weights.map_or(classes as f64, |w| w.iter().map(|&v| v as f64).sum());
    let k64 = 1.0 / opts.temperature;
    let cap64 = opts.softcap.unwrap_or(0.0);
    let c = ce::Ce {
        xf: Xform { k: k64 as f32, cap: cap64 as f32 },
        k64,
        cap64,
        eps: opts.label_smoothing,
        lambda: opts.z_loss,
        main_scale: scale(denominator),
        z_scale: scale(z_den),
        weights: opts.class_weights,
        wsum,
        classes: classes as f64,
        row_stride: 1,
        ignore_index: opts.ignore_index,
        need_lse: false,
        stream: false,
    };
    Plan { valid_rows, denominator, z_den, c }
}

/// Splits the rows into tasks (fixed by shape, never by thread count) and runs the row kernel
/// on each; results come back in row order.
fn run<T: Element>(
    x: &View<'_, T>,
    v: Checked<'_, T>,
    plan: &Plan<'_>,
    opts: &CrossEntropyOptions<'_>,
) -> Vec<Vec<RowOut>> {
    let Checked { rows, len, xs, classes, probs, grad } = v;
    let c = plan.c;
    let level = SimdLevel::resolve(opts.exec.simd);
    let gstride = grad.as_ref().map_or(0, |g| g.1);
    let items: Vec<(usize, usize, Option<&mut [T]>)> = match grad {
        // Pipelined rows go in groups (each group pays one unpipelined first row).
        Some((g, gs)) if ce::pipelined(&c, len, classes.is_some(), true) => {
            par::row_groups_per(g, rows, len, gs, par::pipe_rows_per_task(rows, len))
                .into_iter()
                .map(|(r0, n, g)| (r0, n, Some(g)))
                .collect()
        }
        Some((g, gs)) => par::row_groups(g, rows, len, gs).into_iter().map(|(r0, n, g)| (r0, n, Some(g))).collect(),
        None => {
            let per = par::rows_per_task(len);
            (0..rows).step_by(per).map(|r0| (r0, per.min(rows - r0), None)).collect()
        }
    };
    par::map(opts.exec.par, items, |(r0, n, g)| {
        dispatch(
            level,
            ce::CeRows {
                c,
                x: &x.data[r0 * xs..],
                xs,
                len,
                classes: classes.map(|cl| &cl[r0..r0 + n]),
                probs: probs.map(|(q, qs)| (&q[r0 * qs..], qs)),
                g: g.map(|g| (g, gstride)),
                rows: n,
            },
        )
    })
}

/// [`cross_entropy`] over one shard of the vocabulary (Megatron-LM's vocabulary-parallel
/// cross-entropy, exact): `logits` hold the classes `shard.start .. shard.start + len` of
/// `shard.total` for every row, the targets are global class indices (or the ignore index),
/// and `opts.class_weights`, when given, is the whole vocabulary's (`total` entries).
///
/// The rows run in blocks whose whole-vocabulary logits are about 8 MiB (the same blocks on
/// every shard: their size depends on the row count, `total` and the element type only).
/// Per block: pass 1 computes each row's [`ShardRow`] over this shard with the row kernel's
/// SIMD code (one online max-and-`Σ exp` pass over plain f32 logits; the transformed tiles
/// otherwise, with the target's logit and the smoothing sum); `shard.combine` replaces them by
/// the whole vocabulary's (merged in shard order, the same on every shard); pass 2 writes the
/// gradient of this shard's slice from the global log-sum-exp,
/// `(A·exp(t − m)·exp(m − lse) − B·w)·chain` minus the target's term when the target is
/// here, re-reading the block from the last-level cache and streaming a large gradient past
/// it. Pass 2 of a block runs beside pass 1 of the next (rayon's `join`), so the gradient's
/// writes overlap the next block's reads. Against `cross_entropy` on the same logits the call
/// computes each exponential twice (once per pass): 1.3x its time on plain f32 rows of 32k
/// classes (PERF.md, "smax-mpi").
///
/// Outputs: the loss, [`LossReport`] and row outputs of the whole vocabulary; `grad` the
/// gradient of this shard's slice. Every option except probability targets works as in
/// `cross_entropy` (reduction, ignore index, class weights, label smoothing over `total`
/// classes, z-loss, soft cap, temperature, gradient scale, the special rows). Equal to
/// `cross_entropy` on the whole rows up to the f64 merge of the shards' log-sum-exps and
/// the different rounding of the pieces (tested with 1–4 shards against it and an f64
/// reference, f32, f16, bf16 and f64 logits).
///
/// Errors: those of `cross_entropy`, with targets and class weights checked against `total`;
/// [`Targets::Probs`] ([`Error::Unsupported`]); a shard outside `[0, total)`; the combiner's.
pub fn cross_entropy_sharded<T: Element>(
    logits: View<'_, T>,
    targets: Targets<'_, T>,
    grad: Option<ViewMut<'_, T>>,
    rows_out: RowOutputs<'_>,
    shard: VocabShard<'_>,
    opts: &CrossEntropyOptions<'_>,
) -> Result<LossReport> {
    use ce::shard::{IGNORED, Local, ShardGrad, ShardStats, local_target};
    opts.check(T::REPR != crate::element::Repr::F64)?;
    let (rows, len, xs) = logits.row_geometry(
        "logits",
        "cross-entropy takes row layouts (classes along the last axis, or an axis layout with inner = 1)",
    )?;
    let VocabShard { start, total, combine } = shard;
    if start.checked_add(len).is_none_or(|end| end > total) {
        return Err(Error::bad_parameter(
            "shard",
            format!("start {start} + {len} classes of total {total}"),
            "a range of classes inside [0, total)",
        ));
    }
    if total == 0 && rows > 0 {
        return Err(Error::bad_parameter("classes", "0", "at least one class per row"));
    }
    if let Some(w) = opts.class_weights {
        if w.len() != total {
            return Err(Error::LengthMismatch { what: "class_weights", len: w.len(), expected: total });
        }
    }
    let Targets::Classes(y) = targets else {
        return Err(Error::Unsupported {
            what: "probability targets",
            why: "the sharded cross-entropy takes class targets",
        });
    };
    crate::check::targets(y, rows, total, Some(opts.ignore_index))?;
    let grad = match grad {
        Some(g) => {
            logits.layout.check_same("grad", &g.layout)?;
            let (_, _, gs) = g.row_geometry("grad", "the gradient takes row layouts")?;
            Some((g.data, gs))
        }
        None => None,
    };
    let RowOutputs { loss: mut loss_out, z_loss: mut z_out, lse: mut lse_out } = rows_out;
    for (what, b) in [("loss", &loss_out), ("z_loss", &z_out), ("lse", &lse_out)] {
        if let Some(b) = b {
            if b.len() != rows {
                return Err(Error::RowCountMismatch { what, len: b.len(), rows });
            }
        }
    }
    // The reduction's denominators and the kernel's constants, as `plan` makes them, over the
    // whole vocabulary; the shard's rows use the reserved ignore index of their local targets.
    let weight = |k: usize| opts.class_weights.map_or(1.0, |w| w[k] as f64);
    let Plan { valid_rows, denominator, z_den, mut c } = plan_for(Some(y), rows, total, opts);
    c.row_stride = xs.max(1);
    c.ignore_index = IGNORED;
    c.need_lse = true;
    let wsum = c.wsum;
    let local_y: Vec<i64> = {
        let mut v = crate::check::try_with_capacity("shard targets", rows)?;
        v.extend(y.iter().map(|&t| local_target(t, start, len, opts.ignore_index)));
        v
    };
    let level = SimdLevel::resolve(opts.exec.simd);
    let block = ((8usize << 20) / (core::mem::size_of::<T>() * total.max(1))).clamp(1, rows.max(1));
    let per = par::rows_per_task(len);
    let (g, gs) = match grad {
        Some((g, gs)) => (Some(g), gs),
        None => (None, 0),
    };
    let (eps, lam) = (opts.label_smoothing, opts.z_loss);
    let (mut lsum, mut zsum) = (0.0f64, 0.0f64);
    // A gradient this large goes to memory anyway: its rows bypass the cache.
    let stream = g.as_deref().is_some_and(|g| core::mem::size_of_val(g) >= crate::engine::STREAM_MIN_BYTES);
    // Pass 1 of a block: its rows' statistics over this shard.
    let stats = |r0: usize| -> (Vec<ShardRow>, Vec<Local>) {
        let nb = block.min(rows - r0);
        let items: Vec<usize> = (r0..r0 + nb).step_by(per).collect();
        par::map(opts.exec.par, items, |a| {
            let n = per.min(r0 + nb - a);
            dispatch(level, ShardStats { c, x: &logits.data[a * xs..], xs, len, y: &local_y[a..a + n], start })
        })
        .into_iter()
        .flatten()
        .unzip()
    };
    // Pass 2 of a block: the gradient of its slice, from the combined statistics.
    let grads = |r0: usize, brows: &[ShardRow], local: &[Local], gb: &mut [T]| {
        let nb = brows.len();
        let groups = par::row_groups_per(gb, nb, len, gs, per);
        par::for_each(opts.exec.par, groups, |_, (a, n, gg)| {
            dispatch(
                level,
                ShardGrad {
                    c,
                    x: &logits.data[(r0 + a) * xs..],
                    xs,
                    len,
                    y: &local_y[r0 + a..r0 + a + n],
                    y_global: &y[r0 + a..r0 + a + n],
                    start,
                    rows: &brows[a..a + n],
                    local: &local[a..a + n],
                    g: gg,
                    gs,
                    stream,
                },
            )
        });
    };
    // A software pipeline over the blocks: pass 2 of block b (writing its gradient) runs
    // beside pass 1 of block b + 1 (reading its logits), so memory reads and writes overlap;
    // the exchange of block b + 1 waits for its pass 1 only.
    type Pending<'g, T> = (usize, Vec<ShardRow>, Vec<Local>, &'g mut [T]);
    let mut pending: Option<Pending<'_, T>> = None;
    let mut g_rest = g;
    let mut next_r0 = 0usize;
    loop {
        let this = (next_r0 < rows).then_some(next_r0);
        let job_stats = || this.map(stats);
        let (p, gr) = (pending.take(), &grads);
        let job_grad = move || {
            if let Some((r0, brows, local, gb)) = p {
                gr(r0, &brows, &local, gb);
            }
        };
        let st = match opts.exec.par {
            crate::options::Par::Rayon => rayon::join(job_stats, job_grad).0,
            crate::options::Par::Seq => {
                job_grad();
                job_stats()
            }
        };
        let (Some(r0), Some((mut brows, local))) = (this, st) else { break };
        let nb = block.min(rows - r0);
        next_r0 = r0 + nb;
        combine(&mut brows)?;
        if brows.len() != nb {
            return Err(Error::RowCountMismatch { what: "combined shard rows", len: brows.len(), rows: nb });
        }
        // The block's losses, in row order.
        for (i, st) in brows.iter().enumerate() {
            let r = r0 + i;
            let lse = st.lse;
            let (l, z) = if y[r] == opts.ignore_index {
                (0.0, 0.0)
            } else if lse == f64::NEG_INFINITY {
                (f64::INFINITY, if lam > 0.0 { f64::INFINITY } else { 0.0 })
            } else if !lse.is_finite() {
                (f64::NAN, if lam > 0.0 { lam * lse * lse } else { 0.0 })
            } else {
                let alpha = (1.0 - eps) * weight(y[r] as usize);
                let mut l = if alpha == 0.0 { 0.0 } else { alpha * (lse - st.target_logit) };
                if eps != 0.0 {
                    l += eps / total as f64 * (wsum * lse - st.logit_sum);
                }
                (l, lam * lse * lse)
            };
            lsum += l;
            zsum += z;
            for (out, v) in [(loss_out.as_deref_mut(), l), (z_out.as_deref_mut(), z), (lse_out.as_deref_mut(), lse)] {
                if let Some(o) = out {
                    o[r] = v;
                }
            }
        }
        if let Some(rest) = g_rest.take() {
            // This block's rows of the gradient: up to the next block's first row.
            let cut = if next_r0 < rows { nb * gs } else { rest.len() };
            let (gb, tail) = rest.split_at_mut(cut.min(rest.len()));
            g_rest = Some(tail);
            pending = Some((r0, brows, local, gb));
        }
    }
    let (loss, z_loss) = reduced(opts.reduction, opts.all_ignored, (lsum, denominator), (zsum, z_den));
    Ok(LossReport { loss, z_loss, valid_rows, denominator, flagged_rows: 0 })
}

/// Sums the rows in row order, fills the per-row outputs and applies the reduction.
/// The reduced main loss and z-loss from their sums and the mean's denominators: the main
/// loss over `Σ w` of the rows that count, the z-loss over their number, each by its own
/// denominator, so a reported value always matches the gradient the rows got (with `Σ w = 0`
/// but rows that count, the z-loss and its gradient are those rows' while the main loss has
/// no mean). A mean over a zero denominator is `all_ignored`'s value.
pub(crate) fn reduced(
    r: Reduction,
    all_ignored: AllIgnored,
    (lsum, den): (f64, f64),
    (zsum, z_den): (f64, f64),
) -> (f64, f64) {
    let empty = match all_ignored {
        AllIgnored::Zero => 0.0,
        AllIgnored::Nan => f64::NAN,
    };
    let mean = |s: f64, d: f64| if d > 0.0 { s / d } else { empty };
    match r {
        Reduction::Mean => (mean(lsum, den), mean(zsum, z_den)),
        _ => (lsum, zsum),
    }
}

fn reduce(
    results: &[Vec<RowOut>],
    rows_out: RowOutputs<'_>,
    plan: &Plan<'_>,
    opts: &CrossEntropyOptions<'_>,
) -> LossReport {
    let (denominator, z_den) = (plan.denominator, plan.z_den);
    let RowOutputs { mut loss, mut z_loss, mut lse } = rows_out;
    let (mut lsum, mut zsum) = (0.0f64, 0.0f64);
    for (r, o) in results.iter().flatten().enumerate() {
        lsum += o.loss;
        zsum += o.z;
        if let Some(b) = loss.as_deref_mut() {
            b[r] = o.loss;
        }
        if let Some(b) = z_loss.as_deref_mut() {
            b[r] = o.z;
        }
        if let Some(b) = lse.as_deref_mut() {
            b[r] = o.lse;
        }
    }
    let (loss, z_loss) = reduced(opts.reduction, opts.all_ignored, (lsum, denominator), (zsum, z_den));
    LossReport { loss, z_loss, valid_rows: plan.valid_rows, denominator, flagged_rows: 0 }
}
