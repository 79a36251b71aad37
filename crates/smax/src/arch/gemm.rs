//! A safe, bounds-checked front to the `gemm` crate (f32), the one matrix product the losses
//! need. `gemm` takes raw pointers and strides; this wrapper checks that every element each
//! operand's shape and strides address lies inside its slice before handing the pointers on.

use crate::par::Par;

/// A read-only strided matrix: element `(i, j)` at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose (a view: strides swapped).
    pub fn t(self) -> Self {
        MatRef { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// True when every addressed element is inside `data`.
    fn fits(&self, len: usize) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|a| (self.cols - 1).checked_mul(self.cs).and_then(|b| a.checked_add(b)));
        matches!(last, Some(l) if l < len)
    }
}

/// `dst (m x n, row stride dst_rs) = [dst +] lhs (m x k) · rhs (k x n)`.
///
/// Panics (an internal invariant: callers pass validated shapes) if a shape disagrees or an
/// operand addresses memory outside its slice. Results do not depend on the thread count:
/// `gemm` splits the output, never the `k` reduction.
pub(crate) fn matmul(dst: &mut [f32], dst_rs: usize, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool, par: Par) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "matmul: inner dimensions differ");
    let out = MatRef { data: dst, rows: m, cols: n, rs: dst_rs, cs: 1 };
    assert!(
        out.fits(dst.len()) && lhs.fits(lhs.data.len()) && rhs.fits(rhs.data.len()),
        "matmul: operand out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = match par {
        Par::Seq => gemm::Parallelism::None,
        Par::Rayon => match rayon::current_num_threads() {
            0 | 1 => gemm::Parallelism::None,
            t => gemm::Parallelism::Rayon(t),
        },
    };
    // SAFETY: every element the three (m, n, k) shapes and non-negative strides address was
    // checked above to lie inside its slice; `dst` is borrowed mutably and so does not alias
    // `lhs` or `rhs`, which are only read. Strides fit in isize because they index slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
