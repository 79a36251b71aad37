//! The softmax family's kernel table: its heavy generic entry points instantiated once per
//! element type in this crate (see [`crate::element::per_type`]). A new heavy entry point gets a
//! field here, filled in [`Kernels::ALL`], and its public function calls `(kernels::<T>().field)(…)`.

use super::{backward, forward};
use crate::element::{Element, per_type};
use crate::engine::FwdOp;
use crate::error::Result;
use crate::layout::{View, ViewMut};
use crate::options::Options;

/// The heavy generic entry points, instantiated for one element type.
#[allow(clippy::type_complexity)]
pub(crate) struct Kernels<T: 'static> {
    pub forward: fn(FwdOp, Option<View<'_, T>>, ViewMut<'_, T>, &Options) -> Result<()>,
    pub logsumexp: fn(View<'_, T>, &mut [T], &Options) -> Result<()>,
    pub backward: fn(bool, View<'_, T>, Option<View<'_, T>>, ViewMut<'_, T>, &Options) -> Result<()>,
}

impl<T: Element> Kernels<T> {
    const ALL: Self = Kernels {
        forward: forward::forward_impl::<T>,
        logsumexp: forward::logsumexp_impl::<T>,
        backward: backward::backward_impl::<T>,
    };
}

static F32: Kernels<f32> = Kernels::ALL;
static F64: Kernels<f64> = Kernels::ALL;
static F16: Kernels<half::f16> = Kernels::ALL;
static BF16: Kernels<half::bf16> = Kernels::ALL;

/// The table for `T`.
pub(crate) fn kernels<T: Element>() -> &'static Kernels<T> {
    per_type([&F32, &F64, &F16, &BF16])
}
