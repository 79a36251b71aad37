//! Monomorphic entry points.
//!
//! The public API is generic over [`Element`], and Rust compiles a generic function in the
//! crate that instantiates it (with optimisation on, instances are not shared across crates).
//! Without this table every crate that calls `smax::softmax::<f32>` would compile the whole
//! kernel stack again (every SIMD level, every task): each integration test, the CLI and every
//! user crate. Instead the generic entry points call through [`Kernels`], a table of function
//! pointers per element type held in a `static` of this crate, so the kernels are compiled
//! once, here, and a caller's instance of a public function is a table lookup and a call.
//!
//! To route a new heavy generic entry point through here: move its body into an `_impl`
//! function, add a field below, fill it in [`Kernels::ALL`], and make the public function call
//! `(T::kernels().field)(…)`.

use crate::element::Element;
use crate::error::Result;
use crate::kernel::FwdOp;
use crate::layout::{View, ViewMut};
use crate::loss::{CrossEntropyOptions, LossReport, RowOutputs, Targets};
use crate::options::Options;

/// The heavy generic entry points, instantiated for one element type.
#[allow(clippy::type_complexity)]
pub struct Kernels<T: 'static> {
    pub(crate) forward: fn(FwdOp, Option<View<'_, T>>, ViewMut<'_, T>, &Options) -> Result<()>,
    pub(crate) logsumexp: fn(View<'_, T>, &mut [T], &Options) -> Result<()>,
    pub(crate) backward: fn(bool, View<'_, T>, Option<View<'_, T>>, ViewMut<'_, T>, &Options) -> Result<()>,
    pub(crate) cross_entropy: fn(
        View<'_, T>,
        Targets<'_, T>,
        Option<ViewMut<'_, T>>,
        RowOutputs<'_>,
        &CrossEntropyOptions<'_>,
    ) -> Result<LossReport>,
}

impl<T: Element> Kernels<T> {
    const ALL: Self = Kernels {
        forward: crate::forward::forward_impl::<T>,
        logsumexp: crate::forward::logsumexp_impl::<T>,
        backward: crate::backward::backward_impl::<T>,
        cross_entropy: crate::loss::cross_entropy_impl::<T>,
    };
}

// Statics, not constants: a caller that reads a static links to it; it never evaluates (and so
// never instantiates) what the static holds.
pub(crate) static F32: Kernels<f32> = Kernels::ALL;
pub(crate) static F64: Kernels<f64> = Kernels::ALL;
pub(crate) static F16: Kernels<half::f16> = Kernels::ALL;
pub(crate) static BF16: Kernels<half::bf16> = Kernels::ALL;
