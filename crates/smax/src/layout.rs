//! Layouts: where the rows of a batch live in a flat buffer, and the views that pair a buffer
//! with its layout.
//!
//! Two forms cover every call:
//!
//! * [`Layout::rows`] / [`Layout::strided_rows`]: `rows` rows of `len` elements, row `r`
//!   starting at `r * stride` (the last axis of a tensor, possibly with padded rows).
//! * [`Layout::axis`]: a contiguous `[outer, axis, inner]` block normalised over the middle axis
//!   (any non-last axis of a contiguous tensor). Row `(o, i)` is the `axis` elements
//!   `o*axis*inner + k*inner + i` for `k in 0..axis`; the kernels vectorise across `i`, so
//!   `axis = 0` of a matrix runs as fast as the last axis.
//!
//! Per-row outputs (logsumexp) are ordered by row index: `r` for row layouts and
//! `o * inner + i` for axis layouts.

use crate::error::{Error, Result};

/// The shape and placement of a batch of rows. Cheap to copy; validated when a view is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    pub(crate) kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Rows { rows: usize, len: usize, stride: usize },
    Axis { outer: usize, axis: usize, inner: usize },
}

impl Layout {
    /// `rows` contiguous rows of `len` elements (stride = `len`).
    pub const fn rows(rows: usize, len: usize) -> Self {
        Layout { kind: Kind::Rows { rows, len, stride: len } }
    }

    /// `rows` rows of `len` elements, row `r` starting at element `r * stride`.
    /// `stride < len` is rejected with [`Error::StrideTooSmall`] when a view is built
    /// (for `rows <= 1` the stride is irrelevant and any value is accepted).
    pub const fn strided_rows(rows: usize, len: usize, stride: usize) -> Self {
        Layout { kind: Kind::Rows { rows, len, stride } }
    }

    /// A contiguous `[outer, axis, inner]` block normalised over `axis`.
    pub const fn axis(outer: usize, axis: usize, inner: usize) -> Self {
        Layout { kind: Kind::Axis { outer, axis, inner } }
    }

    /// The layout normalising a contiguous row-major tensor of shape `dims` over axis `axis`:
    /// [`Layout::rows`] when every axis after it has size 1, else [`Layout::axis`] with the
    /// axes before and after it collapsed. Errors: [`Error::BadParameter`] for an axis out of
    /// range, [`Error::SizeOverflow`] when a product of sizes overflows `usize`.
    pub fn for_axis(dims: &[usize], axis: usize) -> Result<Self> {
        if axis >= dims.len() {
            return Err(Error::bad_parameter("axis", axis, "less than the number of dimensions"));
        }
        let product = |d: &[usize]| d.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        let overflow = || Error::SizeOverflow { what: "tensor", shape: format!("{dims:?}") };
        let outer = product(&dims[..axis]).ok_or_else(overflow)?;
        let inner = product(&dims[axis + 1..]).ok_or_else(overflow)?;
        Ok(if inner == 1 { Layout::rows(outer, dims[axis]) } else { Layout::axis(outer, dims[axis], inner) })
    }

    /// Number of rows (independent normalisations).
    pub fn row_count(&self) -> usize {
        match self.kind {
            Kind::Rows { rows, .. } => rows,
            Kind::Axis { outer, inner, .. } => outer.saturating_mul(inner),
        }
    }

    /// Elements per row.
    pub fn row_len(&self) -> usize {
        match self.kind {
            Kind::Rows { len, .. } => len,
            Kind::Axis { axis, .. } => axis,
        }
    }

    /// Distance between consecutive rows when rows are contiguous runs of elements (row
    /// layouts, and axis layouts with `inner = 1`); `None` for other axis layouts. A single
    /// row's stride is irrelevant and reported as its length.
    pub fn row_stride(&self) -> Option<usize> {
        match self.kind {
            // Empty rows all sit at offset 0, whatever the stride (the buffer may be empty).
            Kind::Rows { rows, len, stride } => Some(if rows <= 1 || len == 0 { len } else { stride }),
            Kind::Axis { axis, inner: 1, .. } => Some(axis),
            Kind::Axis { .. } => None,
        }
    }

    /// The number of buffer elements the layout addresses (one past the last element used).
    pub fn required_len(&self) -> Option<usize> {
        match self.kind {
            Kind::Rows { rows, len, stride } => {
                if rows == 0 || len == 0 {
                    Some(0)
                } else {
                    (rows - 1).checked_mul(stride)?.checked_add(len)
                }
            }
            Kind::Axis { outer, axis, inner } => outer.checked_mul(axis)?.checked_mul(inner),
        }
    }

    /// The logical shape, written out for error messages.
    pub(crate) fn describe(&self) -> String {
        match self.kind {
            Kind::Rows { rows, len, stride } => {
                if stride == len {
                    format!("rows({rows} x {len})")
                } else {
                    format!("rows({rows} x {len}, stride {stride})")
                }
            }
            Kind::Axis { outer, axis, inner } => format!("axis([{outer}, {axis}, {inner}])"),
        }
    }

    pub(crate) fn validate(&self, what: &'static str, buf_len: usize) -> Result<()> {
        if let Kind::Rows { rows, len, stride } = self.kind {
            if rows > 1 && len > 0 && stride < len {
                return Err(Error::StrideTooSmall { what, stride, len });
            }
        }
        let needed = self.required_len().ok_or_else(|| Error::SizeOverflow { what, shape: self.describe() })?;
        if buf_len < needed {
            return Err(Error::BufferTooShort { what, len: buf_len, needed });
        }
        Ok(())
    }

    /// True when two layouts describe the same logical batch (same rows and row length, and
    /// for axis layouts the same `[outer, axis, inner]`). Strides may differ.
    pub(crate) fn same_shape(&self, other: &Layout) -> bool {
        match (self.kind, other.kind) {
            (Kind::Rows { rows: r1, len: l1, .. }, Kind::Rows { rows: r2, len: l2, .. }) => r1 == r2 && l1 == l2,
            (Kind::Axis { .. }, Kind::Axis { .. }) => self.kind == other.kind,
            _ => false,
        }
    }

    pub(crate) fn check_same(&self, what: &'static str, other: &Layout) -> Result<()> {
        if self.same_shape(other) {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { what, got: other.describe(), expected: self.describe() })
        }
    }
}

/// A read-only buffer paired with its validated layout. Valid by construction (its fields are
/// private and every constructor validates), so the ops trust it and never check it again.
#[derive(Debug, Clone, Copy)]
pub struct View<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) layout: Layout,
}

impl<'a, T> View<'a, T> {
    /// Pairs `data` with `layout`; fails if the buffer is too short or the stride too small.
    pub fn new(data: &'a [T], layout: Layout) -> Result<Self> {
        layout.validate("input", data.len())?;
        Ok(View { data, layout })
    }

    /// A contiguous `rows x len` view.
    pub fn rows(data: &'a [T], rows: usize, len: usize) -> Result<Self> {
        Self::new(data, Layout::rows(rows, len))
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The buffer the layout addresses (read-only; its length was validated against the
    /// layout when the view was made).
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// `(rows, row length, row stride)` of a view that must be a row layout (rows, or an axis
    /// layout with `inner = 1`); `what` names the argument and `why` says what the operation
    /// accepts when it is not. The view itself was validated when it was made.
    pub(crate) fn row_geometry(&self, what: &'static str, why: &'static str) -> Result<(usize, usize, usize)> {
        self.layout.row_geometry(what, why)
    }
}

impl Layout {
    /// See [`View::row_geometry`].
    pub(crate) fn row_geometry(&self, what: &'static str, why: &'static str) -> Result<(usize, usize, usize)> {
        let s = self.row_stride().ok_or(Error::Unsupported { what, why })?;
        Ok((self.row_count(), self.row_len(), s))
    }
}

/// A writable buffer paired with its validated layout; valid by construction, as [`View`].
#[derive(Debug)]
pub struct ViewMut<'a, T> {
    pub(crate) data: &'a mut [T],
    pub(crate) layout: Layout,
}

impl<'a, T> ViewMut<'a, T> {
    /// Pairs `data` with `layout`; fails if the buffer is too short or the stride too small.
    pub fn new(data: &'a mut [T], layout: Layout) -> Result<Self> {
        layout.validate("output", data.len())?;
        Ok(ViewMut { data, layout })
    }

    /// A contiguous `rows x len` view.
    pub fn rows(data: &'a mut [T], rows: usize, len: usize) -> Result<Self> {
        Self::new(data, Layout::rows(rows, len))
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The buffer, for a caller that writes through the layout itself (an extension crate's
    /// kernel); consumes the view.
    pub fn into_data(self) -> &'a mut [T] {
        self.data
    }

    /// See [`View::row_geometry`].
    pub(crate) fn row_geometry(&self, what: &'static str, why: &'static str) -> Result<(usize, usize, usize)> {
        self.layout.row_geometry(what, why)
    }

    /// A read-only reborrow.
    pub fn as_view(&self) -> View<'_, T> {
        View { data: self.data, layout: self.layout }
    }
}
