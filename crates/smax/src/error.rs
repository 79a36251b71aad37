//! The one error type of the crate.

/// Everything that can be wrong with a call. Every public entry point validates its input once,
/// at the boundary, and returns one of these instead of panicking; the kernels behind it trust
/// validated input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A buffer is shorter than its layout needs.
    #[error("{what}: buffer holds {len} elements but the layout needs {needed}")]
    BufferTooShort {
        /// Which argument (`"input"`, `"output"`, `"dy"`, ...).
        what: &'static str,
        /// Elements the buffer holds.
        len: usize,
        /// Elements the layout addresses.
        needed: usize,
    },
    /// A row stride smaller than the row length (rows would overlap).
    #[error("{what}: row stride {stride} is smaller than the row length {len}")]
    StrideTooSmall {
        /// Which argument.
        what: &'static str,
        /// The stride given.
        stride: usize,
        /// The row length.
        len: usize,
    },
    /// Two arguments describe different logical shapes.
    #[error("{what}: shape {got} does not match the input shape {expected}")]
    ShapeMismatch {
        /// Which argument.
        what: &'static str,
        /// The shape of that argument, written out.
        got: String,
        /// The shape of the input, written out.
        expected: String,
    },
    /// A layout whose element count does not fit in `usize`.
    #[error("{what}: layout {shape} addresses more elements than fit in usize")]
    SizeOverflow {
        /// Which argument.
        what: &'static str,
        /// The shape, written out.
        shape: String,
    },
    /// A parameter outside its documented range.
    #[error("parameter {name} = {value} is out of range: {expected}")]
    BadParameter {
        /// The parameter's name.
        name: &'static str,
        /// The value given, written out.
        value: String,
        /// The accepted range, in words.
        expected: &'static str,
    },
    /// The output of a per-row reduction has the wrong length.
    #[error("{what}: holds {len} values but there are {rows} rows")]
    RowCountMismatch {
        /// Which argument.
        what: &'static str,
        /// Length of the buffer.
        len: usize,
        /// Number of rows in the layout.
        rows: usize,
    },
    /// A class target outside `[0, classes)` that is not the ignore index.
    #[error("target {target} of row {row} is outside [0, {classes}) and is not the ignore index")]
    TargetOutOfRange {
        /// The row.
        row: usize,
        /// The target given.
        target: i64,
        /// The number of classes.
        classes: usize,
    },
    /// A one-dimensional argument (targets, class weights, bias, ...) of the wrong length.
    #[error("{what}: holds {len} values but {expected} are needed")]
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// Length given.
        len: usize,
        /// Length needed.
        expected: usize,
    },
    /// A layout or combination of options the operation does not accept.
    #[error("{what}: {why}")]
    Unsupported {
        /// Which argument or option.
        what: &'static str,
        /// Why, and what is accepted instead.
        why: &'static str,
    },
    /// A NaN or `+inf` logit where the operation needs finite or masked (`-inf`) values.
    #[error("logit {value} at row {row}, index {index}: NaN and +inf are not valid logits here")]
    NonFiniteLogit {
        /// The row.
        row: usize,
        /// The position in the row.
        index: usize,
        /// The value found.
        value: f64,
    },
    /// A row with nothing to choose from (empty, or every entry masked with `-inf`).
    #[error("row {row} has no unmasked entry to choose")]
    NoValidToken {
        /// The row.
        row: usize,
    },
    /// Working memory whose size follows from the arguments (a bin count, a class count, a
    /// split length, a head dimension) that the allocator refused. Returned instead of the
    /// process abort an infallible allocation would cause; memory the system promises but
    /// cannot deliver (overcommit) is outside what a library can detect.
    #[error("{what}: cannot allocate {bytes} bytes of working memory")]
    Allocation {
        /// Which buffer.
        what: &'static str,
        /// The size asked for (saturated at `usize::MAX`).
        bytes: usize,
    },
}

impl Error {
    /// [`Error::BadParameter`]: `name = value` is outside the range `expected` describes.
    pub(crate) fn bad_parameter(name: &'static str, value: impl core::fmt::Display, expected: &'static str) -> Self {
        Error::BadParameter { name, value: value.to_string(), expected }
    }
}

/// Shorthand for `Result<T, smax::Error>`.
pub type Result<T, E = Error> = core::result::Result<T, E>;
