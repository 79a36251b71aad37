//! NumPy arrays as smax buffers: the element type of an array, the smax [`Layout`] that
//! addresses its elements in place, and the slices handed to the kernels.
//!
//! This is the one module of the crate with `unsafe`: a strided array's elements are not one
//! contiguous run of the array itself, so the slice a layout needs is built from the array's
//! data pointer and the extent the layout addresses.

use numpy::{
    Element as NpElement, PyArrayDescr, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use smax::{Layout, f16};

/// The element types smax computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dtype {
    F32,
    F64,
    F16,
    Bf16,
}

/// The element type of `a`, or a `TypeError` naming the ones smax takes. `bfloat16` is the
/// dtype `ml_dtypes` registers (the package imports it before calling here).
pub(crate) fn dtype_of(a: &Bound<'_, PyUntypedArray>) -> PyResult<Dtype> {
    let py = a.py();
    let dt = a.dtype();
    if dt.is_equiv_to(&numpy::dtype::<f32>(py)) {
        return Ok(Dtype::F32);
    }
    if dt.is_equiv_to(&numpy::dtype::<f64>(py)) {
        return Ok(Dtype::F64);
    }
    if dt.is_equiv_to(&numpy::dtype::<f16>(py)) {
        return Ok(Dtype::F16);
    }
    // Looked up by name, fallibly: `numpy::dtype::<bf16>` panics when no package registered it.
    if PyArrayDescr::new(py, "bfloat16").is_ok_and(|b| dt.is_equiv_to(&b)) {
        return Ok(Dtype::Bf16);
    }
    Err(PyTypeError::new_err(format!(
        "smax takes float32, float64, float16 or bfloat16 arrays in native byte order, not {}",
        dt.str()?
    )))
}

/// Calls `$f::<T>($args)` for the element type `$d` (a [`Dtype`]).
macro_rules! dispatch {
    ($d:expr, $f:ident ( $($a:expr),* $(,)? )) => {
        match $d {
            $crate::arrays::Dtype::F32 => $f::<f32>($($a),*),
            $crate::arrays::Dtype::F64 => $f::<f64>($($a),*),
            $crate::arrays::Dtype::F16 => $f::<smax::f16>($($a),*),
            $crate::arrays::Dtype::Bf16 => $f::<smax::bf16>($($a),*),
        }
    };
}
pub(crate) use dispatch;

/// How a layout found by [`layout_for`] addresses rows (an op's input and output layouts must
/// be of one kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Rows,
    Axis,
}

/// Element strides of `a` (`None` when a stride is negative or not a whole number of
/// elements). An axis of length 0 or 1 is never stepped along: its stride, whatever NumPy
/// recorded (negative after `[::-1]`), is reported as 0.
pub(crate) fn element_strides(a: &Bound<'_, PyUntypedArray>) -> Option<Vec<usize>> {
    let item = a.dtype().itemsize() as isize;
    a.strides()
        .iter()
        .zip(a.shape())
        .map(|(&s, &n)| match s {
            _ if n <= 1 => Some(0),
            s if s >= 0 && s % item == 0 => Some((s / item) as usize),
            _ => None,
        })
        .collect()
}

/// The layout that normalises `a` over `axis` in place, starting at the array's first element,
/// or `None` when no smax layout expresses the array's strides (the caller copies it once).
///
/// Two forms: rows along a unit-stride axis whose other axes collapse, in C order, into one
/// run of evenly spaced rows (the last axis of a C array, a sliced matrix, the first axis of a
/// Fortran array), and a C-contiguous `[outer, axis, inner]` block (any axis of a C array).
/// Axes of length 1 carry no stride. The row order is the C order of the other axes in both
/// forms, which is the order of the per-row outputs.
pub(crate) fn layout_for(a: &Bound<'_, PyUntypedArray>, axis: usize) -> Option<(Layout, Kind)> {
    let shape = a.shape();
    let st = element_strides(a)?;
    let len = shape[axis];
    let others = || shape.iter().enumerate().filter(move |&(i, _)| i != axis).map(|(_, &n)| n);
    let rows = others().try_fold(1usize, |p, n| p.checked_mul(n))?;
    if rows == 0 || len == 0 {
        return Some((Layout::rows(rows, len), Kind::Rows));
    }
    if len == 1 || st[axis] == 1 {
        // Walk the other axes from the innermost out: each must step by the one inside it.
        let mut row_stride = None;
        let mut expect: Option<usize> = None;
        let mut ok = true;
        for i in (0..shape.len()).rev().filter(|&i| i != axis && shape[i] > 1) {
            match expect {
                None => row_stride = Some(st[i]),
                Some(e) if e == st[i] => {}
                Some(_) => {
                    ok = false;
                    break;
                }
            }
            expect = Some(st[i].checked_mul(shape[i])?);
        }
        let stride = row_stride.unwrap_or(len);
        if ok && (rows == 1 || stride >= len) {
            return Some((Layout::strided_rows(rows, len, stride), Kind::Rows));
        }
    }
    if c_contiguous(shape, &st) {
        let outer = shape[..axis].iter().product::<usize>();
        let inner = shape[axis + 1..].iter().product::<usize>();
        return Some(if inner == 1 {
            (Layout::rows(outer, len), Kind::Rows)
        } else {
            (Layout::axis(outer, len, inner), Kind::Axis)
        });
    }
    None
}

/// True when `shape`/`st` (element strides) is C-contiguous (axes of length 1 ignored).
fn c_contiguous(shape: &[usize], st: &[usize]) -> bool {
    let mut expect = 1usize;
    for i in (0..shape.len()).rev() {
        if shape[i] == 1 {
            continue;
        }
        if st[i] != expect {
            return false;
        }
        match expect.checked_mul(shape[i]) {
            Some(e) => expect = e,
            None => return false,
        }
    }
    true
}

/// `axis` (negative from the end) as an index into `ndim` axes.
pub(crate) fn normalize_axis(axis: isize, ndim: usize) -> PyResult<usize> {
    let n = ndim as isize;
    let a = if axis < 0 { axis + n } else { axis };
    if ndim == 0 || !(0..n).contains(&a) {
        return Err(PyValueError::new_err(format!("axis {axis} is out of bounds for an array of dimension {ndim}")));
    }
    Ok(a as usize)
}

/// A shared borrow of a typed array (numpy's borrow checker refuses a concurrent mutable
/// borrow of the same memory by other Rust code).
pub(crate) fn read<'py, T: NpElement>(a: &Bound<'py, PyUntypedArray>) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let t = a.cast::<PyArrayDyn<T>>().map_err(|e| PyTypeError::new_err(e.to_string()))?;
    t.try_readonly().map_err(|e| PyValueError::new_err(e.to_string()))
}

/// An exclusive borrow of a typed, writeable array.
pub(crate) fn write<'py, T: NpElement>(a: &Bound<'py, PyUntypedArray>) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    let t = a.cast::<PyArrayDyn<T>>().map_err(|e| PyTypeError::new_err(e.to_string()))?;
    t.try_readwrite().map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The `len` elements from the first element of `a` on.
///
/// Callers pass the `required_len` of a layout that [`layout_for`] built for `a` (or the size
/// of a C-contiguous array); that layout addresses only elements of the array, at
/// non-negative element offsets below `len`.
pub(crate) fn slice<'a, T: NpElement>(a: &'a PyReadonlyArrayDyn<'_, T>, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    // SAFETY: every offset below `len` is an element of the array's allocation: the layout it
    // comes from steps through the array's own strides from its first element (or `len` is
    // the element count of a C-contiguous array). The readonly borrow keeps the array alive
    // and registered as shared for the slice's lifetime; the element type is `T` (checked by
    // the cast that made `a`), and numpy aligns its buffers for their dtype.
    unsafe { std::slice::from_raw_parts(a.data() as *const T, len) }
}

/// The `len` elements from the first element of `a` on, writable (see [`slice`]).
pub(crate) fn slice_mut<'a, T: NpElement>(a: &'a mut PyReadwriteArrayDyn<'_, T>, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: as in `slice`; the readwrite borrow is exclusive among Rust borrows of this
    // memory (numpy's borrow checker refuses to hand out another while it lives), and the
    // kernels write only the elements the layout addresses, all of them the array's own.
    unsafe { std::slice::from_raw_parts_mut(a.data(), len) }
}

/// The number of elements of a layout.
pub(crate) fn extent(l: &Layout) -> PyResult<usize> {
    l.required_len().ok_or_else(|| PyValueError::new_err("the array addresses more elements than fit in usize"))
}

/// The row layout of a 2-D `[rows, row length]` array (`what` names it in the error), or
/// `None` when its rows are not of unit stride (the caller copies it).
pub(crate) fn rows_2d(a: &Bound<'_, PyUntypedArray>, what: &str) -> PyResult<Option<Layout>> {
    if a.ndim() != 2 {
        return Err(PyValueError::new_err(format!("{what} must be 2-D")));
    }
    Ok(match layout_for(a, 1) {
        Some((l, Kind::Rows)) => Some(l),
        _ => None,
    })
}

/// The element count of `a`, which must be C-contiguous (and 1-D when `one_d`).
pub(crate) fn contiguous(a: &Bound<'_, PyUntypedArray>, what: &str, one_d: bool) -> PyResult<usize> {
    if !a.is_c_contiguous() || (one_d && a.ndim() != 1) {
        let shape = if one_d { "a contiguous 1-D array" } else { "C-contiguous" };
        return Err(PyValueError::new_err(format!("{what} must be {shape}")));
    }
    Ok(a.len())
}
