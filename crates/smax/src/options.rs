//! Per-call options: temperature, the masked-row policy, the algorithm, parallelism and the
//! SIMD level.

use crate::arch::SimdLevel;
use crate::error::Result;
pub use crate::par::Par;

/// What softmax and log-softmax return for a row whose entries are all `-inf` (a fully
/// masked row). `logsumexp` of such a row is `-inf` under either policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskedRow {
    /// `0/0`: every output of the row is NaN (PyTorch's answer; the default).
    #[default]
    Nan,
    /// Zero probability mass: softmax gives `0`, log-softmax gives `-inf` (JAX's answer for an
    /// all-false `where`, and what attention kernels return for a query with no keys).
    Zero,
}

/// Which algorithm computes the row statistics `(max, Σ exp)`. All of them give results within
/// the same documented bounds; they differ in memory traffic and arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Chosen by the op, the element type and the row length alone, from measurements on
    /// AVX2/AVX-512 machines (see [`Algorithm::resolve`] for softmax and log-softmax,
    /// [`Algorithm::resolve_logsumexp`]).
    #[default]
    Auto,
    /// Three passes (XNNPACK's "reload" variant): max; `exp(x − max)` stored to the output and
    /// summed; the output scaled by `1/Σ`. Reads the input twice, the output once, writes it
    /// twice. Best for rows that stay in cache. Log-softmax stores `(x − max)/τ` in pass 2 and
    /// subtracts `ln Σ` in pass 3 (two roundings, within the documented bound). An f16/bf16
    /// row up to 256 Ki elements is widened once into an f32 copy (per-thread scratch) and
    /// runs these passes on it: its output is the f32 op's output on the widened values,
    /// rounded once. Longer f16/bf16 rows, and logsumexp, run max; `Σ exp`; write.
    ThreePass,
    /// Two passes (Dukhan & Ablavatski 2020, "The Two-Pass Softmax Algorithm"): pass 1 keeps
    /// each `exp(x)` as a mantissa and an exponent and needs no max pass; pass 2 writes. Rows
    /// holding a non-finite value or whose largest entry has magnitude ≥ 4.19·10^6 (after the
    /// temperature) redo pass 1 with [`Algorithm::Online`]. It costs about 30 vector operations per input
    /// vector against about 18 for the online pass (whose second read of each 256-element
    /// block hits L1), so `Auto` does not pick it: on the machines measured it is slower both
    /// out of cache and in L1.
    TwoPass,
    /// The online normaliser (Milakov & Gimelshein 2018), blocked: a running `(max, Σ)` state
    /// updated once per block of 256 elements, then the write pass. Two reads, one write. On
    /// f32 with a separate output, rows run as a software pipeline: the write pass of row `r`
    /// carries the online pass of row `r + 1` in the same loop (bit for bit the row-by-row
    /// result, which is what in-place calls compute).
    Online,
}

impl Algorithm {
    /// The algorithm `Auto` resolves to for softmax rows of `len` elements:
    /// [`Algorithm::ThreePass`] up to 4 Ki elements, [`Algorithm::Online`] above. The choice
    /// depends on the row length alone, so a row's result never depends on the rest of the
    /// call. On f32 with a separate output, the online write pass over each row also runs the
    /// online pass over the next row (software pipelining: two reads and a write overlap in
    /// one loop, as in a triad) and streams its output past the cache when the output is
    /// large; three-pass computes each exponential once but writes through the cache. The
    /// crossover was measured with `smax bench` (in cache, three-pass is ahead up to 4 Ki and
    /// online from 8 Ki). This is the rule for f32; on f16 and bf16 rows, `Auto` runs
    /// three-pass up to 256 Ki elements for softmax and 32 Ki for log-softmax (the row is
    /// widened once, see [`Algorithm::ThreePass`], where the online algorithm would convert it
    /// twice).
    pub fn resolve(self, len: usize) -> Algorithm {
        self.auto_up_to(len, AUTO_SOFTMAX_THREE_PASS_MAX)
    }

    /// The algorithm `Auto` resolves to for log-softmax rows of `len` elements:
    /// [`Algorithm::ThreePass`] up to 1 Ki elements, [`Algorithm::Online`] above (see
    /// [`Algorithm::resolve`]). Log-softmax's write pass is a subtraction, so the pipelined
    /// online algorithm pays less for its second exponential than softmax does; up to 1 Ki,
    /// three-pass rows run a group of rows pass by pass and measured 1.11–1.16x the online
    /// algorithm, at 1.5 Ki the two tie (crossover measured with `smax bench`).
    pub fn resolve_log_softmax(self, len: usize) -> Algorithm {
        self.auto_up_to(len, AUTO_LOG_SOFTMAX_THREE_PASS_MAX)
    }

    /// The algorithm `Auto` resolves to for logsumexp over rows of `len` elements, which has no
    /// write pass: [`Algorithm::ThreePass`] up to 4 Ki elements (the sum pass re-reads the row
    /// from L1), [`Algorithm::Online`] (one read, its exponentials overlapping the next
    /// lines' fetch) above (crossover measured with `smax bench`).
    pub fn resolve_logsumexp(self, len: usize) -> Algorithm {
        self.auto_up_to(len, AUTO_LOGSUMEXP_THREE_PASS_MAX)
    }

    /// `Auto`: three-pass for rows of at most `three_pass_max` elements, online above; any
    /// other algorithm as asked.
    fn auto_up_to(self, len: usize, three_pass_max: usize) -> Algorithm {
        match self {
            Algorithm::Auto if len <= three_pass_max => Algorithm::ThreePass,
            Algorithm::Auto => Algorithm::Online,
            a => a,
        }
    }
}

/// Softmax rows longer than this go through the (pipelined) online algorithm under `Auto`.
pub(crate) const AUTO_SOFTMAX_THREE_PASS_MAX: usize = 4 * 1024;

/// Log-softmax rows longer than this go through the (pipelined) online algorithm under `Auto`.
pub(crate) const AUTO_LOG_SOFTMAX_THREE_PASS_MAX: usize = 1024;

/// Logsumexp rows longer than this go through the online algorithm under `Auto`.
pub(crate) const AUTO_LOGSUMEXP_THREE_PASS_MAX: usize = 4 * 1024;

/// The execution settings every options struct of the crate carries as its `exec` field:
/// threads and the SIMD level. Neither changes a result bit for a given SIMD level: work is
/// split by fixed shapes, never by thread count. `Exec::default()` is rayon and the best SIMD
/// level the CPU has (or `SMAX_SIMD`). Ops computed in scalar f64 (the `calibrate` metrics,
/// `quant`, the f64 losses) read only `par`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exec {
    /// Threads.
    pub par: Par,
    /// Forces a SIMD level (clamped to what the CPU has). `None`: `SMAX_SIMD` or the best.
    pub simd: Option<SimdLevel>,
}

impl Exec {
    /// The calling thread only, best SIMD level.
    pub const SEQ: Exec = Exec { par: Par::Seq, simd: None };
}

/// Declares a public options or parameters struct together with its `Default`: each field is
/// written `pub name: Type = default,`, so a field's default stands beside its documentation
/// (which gains a "Default:" line) and the two cannot drift apart.
macro_rules! defaults {
    (
        $(#[$m:meta])*
        pub struct $name:ident $(<$lt:lifetime>)? {
            $( $(#[$fm:meta])* pub $f:ident : $t:ty = $d:expr ),* $(,)?
        }
    ) => {
        $(#[$m])*
        pub struct $name $(<$lt>)? {
            $(
                $(#[$fm])*
                #[doc = ""]
                #[doc = concat!("Default: `", stringify!($d), "`.")]
                pub $f: $t,
            )*
        }

        impl $(<$lt>)? Default for $name $(<$lt>)? {
            fn default() -> Self {
                $name { $($f: $d),* }
            }
        }
    };
}
pub(crate) use defaults;

/// Generates the builder setters of an options struct, the one way every options struct of the
/// crate gets them: `field(v)` for each plain field listed, `field(v)` setting `Some(v)` for
/// each field listed under `some`, and `par(p)` / `simd(level)` writing into `exec`.
macro_rules! setters {
    ($ty:ident $(<$($g:tt),*>)? { $($f:ident: $t:ty),* $(,)? } $(some { $($of:ident: $ot:ty),* $(,)? })?) => {
        impl$(<$($g),*>)? $ty$(<$($g),*>)? {
            $(
                #[doc = concat!("Sets `", stringify!($f), "` (see the field).")]
                pub fn $f(mut self, v: $t) -> Self {
                    self.$f = v;
                    self
                }
            )*
            $($(
                #[doc = concat!("Sets `", stringify!($of), "` to `Some(v)` (see the field).")]
                pub fn $of(mut self, v: $ot) -> Self {
                    self.$of = Some(v);
                    self
                }
            )*)?
            /// Sets the threads (`exec.par`).
            pub fn par(mut self, p: $crate::Par) -> Self {
                self.exec.par = p;
                self
            }
            /// Forces a SIMD level (`exec.simd`).
            pub fn simd(mut self, l: $crate::SimdLevel) -> Self {
                self.exec.simd = Some(l);
                self
            }
        }
    };
}
pub(crate) use setters;

defaults! {
    /// Options of the core normalisers (`softmax`, `log_softmax`, `logsumexp` and their backward
    /// passes). `Options::default()` is plain softmax: temperature 1, NaN for fully masked rows,
    /// automatic algorithm, rayon, best SIMD level.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Options {
        /// Divides the inputs: `softmax(x / τ)`. Must be finite and `> 0` with `1/τ` finite in
        /// the compute type ([`Error::BadParameter`](crate::Error::BadParameter) otherwise).
        /// Applied after the max shift, as `(x − max)·(1/τ)`, so no τ can overflow the exponent.
        pub temperature: f64 = 1.0,
        /// Result for fully masked rows (softmax and log-softmax).
        pub masked_row: MaskedRow = MaskedRow::Nan,
        /// Algorithm for row layouts (axis layouts always run three passes over column blocks).
        pub algorithm: Algorithm = Algorithm::Auto,
        /// Threads and SIMD level.
        pub exec: Exec = Exec::default(),
    }
}

setters!(Options { temperature: f64, masked_row: MaskedRow, algorithm: Algorithm });

impl Options {
    /// `1/τ` in f32 and f64, validated.
    pub(crate) fn inv_temperature(&self, f32_compute: bool) -> Result<(f32, f64)> {
        crate::check::inv_temperature(self.temperature, f32_compute)
    }
}
