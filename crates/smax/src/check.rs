//! Validators shared by the families: one definition per rule, so every op reports the same
//! error for the same mistake.

use crate::error::{Error, Result};

/// Class targets: exactly `rows` of them, each in `[0, classes)` or equal to `ignore`.
/// Errors: [`Error::LengthMismatch`] (`what: "targets"`), then [`Error::TargetOutOfRange`] for
/// the first bad row.
pub(crate) fn targets(t: &[i64], rows: usize, classes: usize, ignore: Option<i64>) -> Result<()> {
    if t.len() != rows {
        return Err(Error::LengthMismatch { what: "targets", len: t.len(), expected: rows });
    }
    let in_range = |v: i64| usize::try_from(v).is_ok_and(|v| v < classes);
    match t.iter().enumerate().find(|(_, v)| Some(**v) != ignore && !in_range(**v)) {
        Some((row, &target)) => Err(Error::TargetOutOfRange { row, target, classes }),
        None => Ok(()),
    }
}

/// A temperature `τ` and its inverse `(1/τ as f32, 1/τ)`: valid when `τ` is finite and > 0 and
/// `1/τ` is finite (and, where the compute type is f32, finite and > 0 in f32), so no
/// `x·(1/τ)` of a finite logit starts out infinite or zero because of `τ` alone.
pub(crate) fn inv_temperature(t: f64, f32_compute: bool) -> Result<(f32, f64)> {
    let bad =
        || Error::bad_parameter("temperature", t, "finite and > 0, with 1/temperature finite in the compute type");
    if !(t.is_finite() && t > 0.0) {
        return Err(bad());
    }
    let k64 = 1.0 / t;
    let k32 = k64 as f32;
    if !k64.is_finite() || (f32_compute && !(k32.is_finite() && k32 > 0.0)) {
        return Err(bad());
    }
    Ok((k32, k64))
}

/// The product of `dims`, or [`Error::SizeOverflow`] naming `what` when it does not fit in
/// `usize`.
pub(crate) fn product(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::SizeOverflow { what, shape: format!("{dims:?}") })
}

/// An empty vector with room for `n` elements, allocated fallibly: a size the allocator
/// refuses is [`Error::Allocation`] naming `what`, instead of a process abort.
pub(crate) fn try_with_capacity<T>(what: &'static str, n: usize) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| Error::Allocation { what, bytes: n.saturating_mul(core::mem::size_of::<T>()) })?;
    Ok(out)
}

/// `n` copies of `v`, allocated as [`try_with_capacity`].
pub(crate) fn try_vec<T: Clone>(what: &'static str, n: usize, v: T) -> Result<Vec<T>> {
    let mut out = try_with_capacity(what, n)?;
    out.resize(n, v);
    Ok(out)
}
