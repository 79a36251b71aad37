//! The softmax family: softmax, log-softmax, logsumexp and their backward passes over row and
//! axis layouts (the public functions are re-exported at the crate root). `forward.rs` and
//! `backward.rs` are the drivers (validate → plan → split → dispatch), `axis.rs` the
//! column-block tasks for non-last axes; the row bodies live in the shared row engine
//! (`crate::engine`), which the cross-entropy runs too.

pub(crate) mod axis;
pub(crate) mod backward;
pub(crate) mod forward;
mod table;

use crate::element::Element;
use crate::engine::FwdOp;
use crate::error::Result;
use crate::layout::{self, Layout, View, ViewMut};
use crate::options::Options;

/// `softmax(x)` into `y` (same logical shape; strides may differ).
///
/// Algorithm: [`Options::algorithm`] (three-pass, two-pass or online; `Auto` by row length).
/// Error bound and special values: see the [crate docs](crate).
pub fn softmax<T: Element>(x: View<'_, T>, y: ViewMut<'_, T>, opts: &Options) -> Result<()> {
    (table::kernels::<T>().forward)(FwdOp::Softmax, Some(x), y, opts)
}

/// `softmax` over `xy` in place.
pub fn softmax_inplace<T: Element>(xy: ViewMut<'_, T>, opts: &Options) -> Result<()> {
    (table::kernels::<T>().forward)(FwdOp::Softmax, None, xy, opts)
}

/// `softmax(x)` into a new contiguous buffer (row layouts become contiguous rows; axis layouts
/// keep their shape).
pub fn softmax_to_vec<T: Element>(x: View<'_, T>, opts: &Options) -> Result<Vec<T>> {
    to_vec_like(x, |x, y| softmax(x, y, opts))
}

/// `log_softmax(x) = (x − m)/τ − ln Σ exp((x − m)/τ)` into `y`.
pub fn log_softmax<T: Element>(x: View<'_, T>, y: ViewMut<'_, T>, opts: &Options) -> Result<()> {
    (table::kernels::<T>().forward)(FwdOp::LogSoftmax, Some(x), y, opts)
}

/// `log_softmax` over `xy` in place.
pub fn log_softmax_inplace<T: Element>(xy: ViewMut<'_, T>, opts: &Options) -> Result<()> {
    (table::kernels::<T>().forward)(FwdOp::LogSoftmax, None, xy, opts)
}

/// `log_softmax(x)` into a new contiguous buffer.
pub fn log_softmax_to_vec<T: Element>(x: View<'_, T>, opts: &Options) -> Result<Vec<T>> {
    to_vec_like(x, |x, y| log_softmax(x, y, opts))
}

/// `logsumexp` of every row into `out` (`out.len()` must equal the row count; row order as
/// documented in [`layout`](Layout)). Empty and fully masked rows give `-inf`.
pub fn logsumexp<T: Element>(x: View<'_, T>, out: &mut [T], opts: &Options) -> Result<()> {
    (table::kernels::<T>().logsumexp)(x, out, opts)
}

/// `logsumexp` of every row into a new buffer.
pub fn logsumexp_to_vec<T: Element>(x: View<'_, T>, opts: &Options) -> Result<Vec<T>> {
    let mut out = vec![T::default(); x.layout.row_count()];
    logsumexp(x, &mut out, opts)?;
    Ok(out)
}

/// Softmax backward from the forward output: `dx = y ⊙ (dy − Σ dy·y) / τ`.
/// `y`, `dy` and `dx` share one logical shape; strides may differ.
pub fn softmax_backward<T: Element>(y: View<'_, T>, dy: View<'_, T>, dx: ViewMut<'_, T>, opts: &Options) -> Result<()> {
    (table::kernels::<T>().backward)(false, y, Some(dy), dx, opts)
}

/// Softmax backward with the upstream gradient in `dy_dx`, overwritten by `dx`.
pub fn softmax_backward_inplace<T: Element>(y: View<'_, T>, dy_dx: ViewMut<'_, T>, opts: &Options) -> Result<()> {
    (table::kernels::<T>().backward)(false, y, None, dy_dx, opts)
}

/// Softmax backward into a new buffer shaped like `y`.
pub fn softmax_backward_to_vec<T: Element>(y: View<'_, T>, dy: View<'_, T>, opts: &Options) -> Result<Vec<T>> {
    to_vec_like(y, |y, dx| softmax_backward(y, dy, dx, opts))
}

/// Log-softmax backward from the forward output: `dx = (dy − exp(y)·Σ dy) / τ`.
pub fn log_softmax_backward<T: Element>(
    y: View<'_, T>,
    dy: View<'_, T>,
    dx: ViewMut<'_, T>,
    opts: &Options,
) -> Result<()> {
    (table::kernels::<T>().backward)(true, y, Some(dy), dx, opts)
}

/// Log-softmax backward with the upstream gradient in `dy_dx`, overwritten by `dx`.
pub fn log_softmax_backward_inplace<T: Element>(y: View<'_, T>, dy_dx: ViewMut<'_, T>, opts: &Options) -> Result<()> {
    (table::kernels::<T>().backward)(true, y, None, dy_dx, opts)
}

/// Log-softmax backward into a new buffer shaped like `y`.
pub fn log_softmax_backward_to_vec<T: Element>(y: View<'_, T>, dy: View<'_, T>, opts: &Options) -> Result<Vec<T>> {
    to_vec_like(y, |y, dx| log_softmax_backward(y, dy, dx, opts))
}

/// Runs `run(x, y)` into a new buffer `y` shaped like `x` (see [`alloc_like`]).
fn to_vec_like<'a, T: Element>(
    x: View<'a, T>,
    run: impl FnOnce(View<'a, T>, ViewMut<'_, T>) -> Result<()>,
) -> Result<Vec<T>> {
    let (mut y, l) = alloc_like(&x)?;
    run(x, ViewMut::new(&mut y, l)?)?;
    Ok(y)
}

fn alloc_like<T: Element>(x: &View<'_, T>) -> Result<(Vec<T>, Layout)> {
    let l = match x.layout.kind {
        layout::Kind::Rows { rows, len, .. } => Layout::rows(rows, len),
        layout::Kind::Axis { .. } => x.layout,
    };
    let n = l.required_len().unwrap_or(0);
    Ok((vec![T::default(); n], l))
}
