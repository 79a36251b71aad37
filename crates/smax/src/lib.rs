//! # smax — the softmax family, exact and at memory speed
//!
//! Row-wise normalisers for f32, f64, f16 and bf16 with their backward passes, runtime SIMD
//! dispatch (AVX-512, AVX2+FMA, NEON, scalar), deterministic threading, and one documented
//! answer for every special value.
//!
//! ```
//! use smax::{Layout, Options, View, ViewMut};
//! let x = [1.0f32, 2.0, 3.0, 4.0];
//! let mut y = [0.0f32; 4];
//! smax::softmax(View::rows(&x, 1, 4)?, ViewMut::rows(&mut y, 1, 4)?, &Options::default())?;
//! assert!((y[3] - 0.643_914_26).abs() < 1e-6);
//! let lse = smax::logsumexp_to_vec(View::rows(&x, 1, 4)?, &Options::default())?;
//! assert!((lse[0] - 4.440_189_7).abs() < 1e-5);
//! # Ok::<(), smax::Error>(())
//! ```
//!
//! ## The maths
//!
//! For a row `x` of length `n` and temperature `τ` (default 1), with `m = max_i x_i`:
//!
//! * `S = Σ_i exp((x_i − m)/τ)`, `logsumexp(x) = m/τ + ln S`
//! * `softmax(x)_i = exp((x_i − m)/τ) / S`
//! * `log_softmax(x)_i = (x_i − m)/τ − ln S` (never `ln(softmax)`: that loses small probabilities)
//! * backward, with `p = softmax(x)` and upstream `g`:
//!   `softmax: dx_i = p_i (g_i − Σ_j g_j p_j) / τ`; `log_softmax: dx_i = (g_i − p_i Σ_j g_j) / τ`,
//!   computed from the forward *output* only (one residual).
//!
//! Shifting by the max first means no input and no temperature can overflow `exp`.
//!
//! ## Layouts
//!
//! Every call takes [`View`]s: a buffer plus a [`Layout`]. Rows may be strided
//! ([`Layout::strided_rows`]); a non-last axis of a contiguous tensor is
//! [`Layout::axis`] and runs vectorised across the inner dimension. Outputs go to caller
//! buffers; `*_inplace` variants overwrite the input, `*_to_vec` variants allocate. Input and
//! output cannot overlap except through the `*_inplace` variants: Rust's borrow rules forbid a
//! `&[T]` and a `&mut [T]` to the same memory, so overlap is ruled out at compile time rather
//! than checked at run time.
//!
//! ## Special values (`shared/spec/ALGORITHMS.md` §0.1)
//!
//! | row contains | `softmax` | `log_softmax` | `logsumexp` | backward |
//! |---|---|---|---|---|
//! | a NaN | all NaN | all NaN | NaN | NaN propagates |
//! | `+inf` (no NaN) | all NaN (`inf − inf`) | all NaN | `+inf` | — |
//! | only `-inf` (fully masked) | NaN, or 0 with [`MaskedRow::Zero`] | NaN, or `-inf` with `Zero` | `-inf` | softmax: 0 for `y = 0`; log-softmax: 0 when `y` is all `-inf` |
//! | one finite value, rest `-inf` | 1 there, 0 elsewhere | 0 there, `-inf` elsewhere | that value | finite |
//! | nothing (`n = 0`) | empty row | empty row | `-inf` | empty row |
//! | `±1e30`, subnormals | exact (shift first) | exact | exact | exact |
//!
//! Results below the smallest normal f32 (`exp(x − m) < 2^-126`, i.e. `(x − m)/τ < −87.34`)
//! are flushed to `+0` on the f32/f16/bf16 path.
//!
//! ## Accuracy (asserted by the test suite)
//!
//! Let `u = 2^-24` (f32 unit roundoff), `d_i = |x_i − m|/τ`, `n` the row length, and `y`, `l`,
//! `ℓ` the exact softmax, log-softmax and logsumexp. On the f32 compute path (f32, and f16/bf16
//! before their final rounding), for every algorithm and SIMD level:
//!
//! * `exp` kernel: ≤ 2 ULP on `[−87.34, 0]` (exhaustive test; measured max 1.981 ULP).
//! * softmax: `|ŷ_i − y_i| ≤ (80 + 2·d_i + 2·ln n)·u·y_i + 2^-125`.
//! * log-softmax: `|l̂_i − l_i| ≤ 2u·(d_i + |l_i|) + (80 + 2·ln n)·u`.
//! * logsumexp: `|ℓ̂ − ℓ| ≤ 3u·|ℓ| + (80 + 4·ln n)·u`.
//! * softmax backward: `≤ 80u·|y_i|·(|g_i| + 2·Σ_j |g_j y_j|)/τ`;
//!   log-softmax backward: `≤ 80u·(|g_i| + e^{y_i}·Σ_j |g_j|)/τ`.
//! * f16/bf16 add their final rounding (`2^-11`, `2^-8` relative; f16 also `2^-24` absolute).
//! * f64: the same expressions with `u = 2^-53`.
//!
//! Row sums are taken in blocks of 256 elements (four f32 vector accumulators) merged in f64,
//! which is why the row length enters only through `ln n`.
//!
//! ## Threads and determinism
//!
//! Rows are batched into tasks of ≈16 Ki elements; rows longer than 256 Ki elements are split
//! into fixed 256 Ki chunks whose partial states merge in chunk order. Nothing depends on the
//! number of threads or on the other rows of the call, so results are bitwise identical for
//! every pool size and every batch composition (`NEEDS.md` guarantees 11 and 12). Choose a
//! pool with `rayon::ThreadPool::install`, or [`Par::Seq`] for the calling thread only.
//!
//! ## SIMD
//!
//! See [`SimdLevel`]. `SMAX_SIMD=scalar|avx2|avx512|neon` forces the level for a process;
//! [`Options::simd`] forces it for a call.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
// Kernels index several parallel slices by one counter; nested `if let` reads clearer here.
// Internal kernels that take many scalar parameters (inlined into one target-feature region)
// allow `too_many_arguments` one by one; no public function does.
#![allow(clippy::needless_range_loop, clippy::collapsible_if)]

mod arch;
pub mod attention;
pub mod calibrate;
mod check;
mod element;
mod engine;
mod error;
pub mod gate;
mod layout;
pub mod loss;
mod options;
mod par;
pub mod quant;
pub mod sample;
mod scalar64;
mod softmax;
mod state;

pub mod math;

pub use arch::SimdLevel;
pub use element::Element;
pub use error::{Error, Result};
pub use layout::{Layout, View, ViewMut};
pub use options::{Algorithm, Exec, MaskedRow, Options, Par};
pub use state::LseState;

pub use half::{bf16, f16};

/// The README's examples, compiled and run by `cargo test --doc` so they follow the API.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

pub use softmax::{
    log_softmax, log_softmax_backward, log_softmax_backward_inplace, log_softmax_backward_to_vec, log_softmax_inplace,
    log_softmax_to_vec, logsumexp, logsumexp_to_vec, softmax, softmax_backward, softmax_backward_inplace,
    softmax_backward_to_vec, softmax_inplace, softmax_to_vec,
};
