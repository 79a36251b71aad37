//! Per-call options: temperature, the masked-row policy, the algorithm, parallelism and the
//! SIMD level.

use crate::arch::SimdLevel;
use crate::error::{Error, Result};

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
    /// Chosen by row length alone from measurements on AVX2/AVX-512 machines (see
    /// [`Algorithm::resolve`] for softmax and log-softmax, [`Algorithm::resolve_logsumexp`]).
    #[default]
    Auto,
    /// Three passes (XNNPACK's "reload" variant): max; `exp(x − max)` stored to the output and
    /// summed; the output scaled by `1/Σ`. Reads the input twice, the output once, writes it
    /// twice. Best for rows that stay in cache. Log-softmax on f32 stores `(x − max)/τ` in
    /// pass 2 and subtracts `ln Σ` in pass 3 (two roundings, within the documented bound);
    /// f16/bf16 log-softmax and logsumexp run max; `Σ exp`; write.
    ThreePass,
    /// Two passes (Dukhan & Ablavatski 2020, "The Two-Pass Softmax Algorithm"): pass 1 keeps
    /// each `exp(x)` as a mantissa and an exponent and needs no max pass; pass 2 writes. Rows
    /// holding a non-finite value or an entry of magnitude ≥ 2^22 (after the temperature)
    /// redo pass 1 with [`Algorithm::Online`]. It costs about 30 vector operations per input
    /// vector against about 18 for the online pass (whose second read of each 256-element
    /// block hits L1), so `Auto` does not pick it on the machines measured: `smax bench`,
    /// AVX-512, 2 threads, 4x16777216, two-pass 0.56 of copy (logsumexp 0.71 of read) against
    /// online 0.70 (0.83); in L1, 1 thread, logsumexp 12 against 18 GB/s.
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
    /// large; three-pass computes each exponential once but writes through the cache.
    /// Measured with `smax bench`, 2 threads, AVX-512, as fractions of the copy roofline, out
    /// of cache: online 0.84–0.88 vs three-pass 0.72–0.76 at 2048x32768, 0.89 vs 0.62 at
    /// 512x131072, 0.73–0.80 vs 0.36 at 64x1048576, 0.77–0.81 vs 0.72–0.76 at 16384x4096;
    /// three-pass ahead at 65536x1024 (0.75–0.78 vs 0.72). In cache, three-pass is ahead up
    /// to 4 Ki (256x4096: 0.18–0.21 vs 0.21–0.30 ms) and online from 8 Ki (128x8192).
    pub fn resolve(self, len: usize) -> Algorithm {
        match self {
            Algorithm::Auto => {
                if len <= AUTO_SOFTMAX_THREE_PASS_MAX {
                    Algorithm::ThreePass
                } else {
                    Algorithm::Online
                }
            }
            a => a,
        }
    }

    /// The algorithm `Auto` resolves to for log-softmax rows of `len` elements:
    /// [`Algorithm::ThreePass`] up to 512 elements, [`Algorithm::Online`] above (see
    /// [`Algorithm::resolve`]). Log-softmax's write pass is a subtraction, so the pipelined
    /// online algorithm pays less for its second exponential than softmax does. Measured
    /// with `smax bench` (AVX-512, fractions of the copy roofline), 2 threads out of cache:
    /// online 0.80–0.82 vs three-pass 0.71–0.77 at 65536x1024, 0.87–0.89 vs 0.72–0.76 at
    /// 16384x4096, 0.93–1.01 vs 0.62 at 512x131072; three-pass ahead at 131072x512 (22–25 vs
    /// 32–34 ms). 1 thread at 32768x2048: 44 vs 49 ms. In cache at 1 Ki, online is ahead
    /// with 2 threads (1024x1024: 0.16–0.18 vs 0.18–0.21 ms), three-pass with 1 (10 %).
    pub fn resolve_log_softmax(self, len: usize) -> Algorithm {
        match self {
            Algorithm::Auto => {
                if len <= AUTO_LOG_SOFTMAX_THREE_PASS_MAX {
                    Algorithm::ThreePass
                } else {
                    Algorithm::Online
                }
            }
            a => a,
        }
    }

    /// The algorithm `Auto` resolves to for logsumexp over rows of `len` elements, which has no
    /// write pass: [`Algorithm::ThreePass`] up to 4 Ki elements (the sum pass re-reads the row
    /// from L1), [`Algorithm::Online`] (one read, its exponentials overlapping the next
    /// lines' fetch) above. Measured with `smax bench`, 2 threads, AVX-512, fractions of the
    /// read roofline, medians of 4 runs, three-pass vs online: 65536x1024 0.84 vs 0.78,
    /// 16384x4096 0.85–0.92 vs 0.85–0.90, 8192x8192 0.83 vs 0.85, 4096x16384 0.78 vs 0.87,
    /// 2048x32768 0.83 vs 0.94, 512x131072 0.82 vs 0.88, 256x262144 0.81 vs 0.92.
    pub fn resolve_logsumexp(self, len: usize) -> Algorithm {
        match self {
            Algorithm::Auto => {
                if len <= AUTO_LOGSUMEXP_THREE_PASS_MAX {
                    Algorithm::ThreePass
                } else {
                    Algorithm::Online
                }
            }
            a => a,
        }
    }
}

/// Softmax rows longer than this go through the (pipelined) online algorithm under `Auto`.
pub(crate) const AUTO_SOFTMAX_THREE_PASS_MAX: usize = 4 * 1024;

/// Log-softmax rows longer than this go through the (pipelined) online algorithm under `Auto`.
pub(crate) const AUTO_LOG_SOFTMAX_THREE_PASS_MAX: usize = 512;

/// Logsumexp rows longer than this go through the online algorithm under `Auto`.
pub(crate) const AUTO_LOGSUMEXP_THREE_PASS_MAX: usize = 4 * 1024;

/// How a call may use threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Par {
    /// The calling thread only.
    Seq,
    /// The current rayon pool (the global one, or the one a caller entered with
    /// `ThreadPool::install`). Work is split by a fixed grain, so results are bitwise identical
    /// for every pool size.
    #[default]
    Rayon,
}

/// Options shared by every normaliser. `Options::default()` is plain softmax: temperature 1,
/// NaN for fully masked rows, automatic algorithm, rayon, best SIMD level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Divides the inputs: `softmax(x / τ)`. Must be finite and `> 0` with `1/τ` finite in the
    /// compute type ([`Error::BadParameter`] otherwise). Applied after the max shift, as
    /// `(x − max)·(1/τ)`, so no τ can overflow the exponent.
    pub temperature: f64,
    /// Result for fully masked rows (softmax and log-softmax).
    pub masked_row: MaskedRow,
    /// Algorithm for row layouts (axis layouts always run three passes over column blocks).
    pub algorithm: Algorithm,
    /// Threads.
    pub par: Par,
    /// Forces a SIMD level (clamped to what the CPU has). `None`: `SMAX_SIMD` or the best.
    pub simd: Option<SimdLevel>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            temperature: 1.0,
            masked_row: MaskedRow::Nan,
            algorithm: Algorithm::Auto,
            par: Par::Rayon,
            simd: None,
        }
    }
}

impl Options {
    /// Sets the temperature.
    pub fn temperature(mut self, t: f64) -> Self {
        self.temperature = t;
        self
    }
    /// Sets the masked-row policy.
    pub fn masked_row(mut self, m: MaskedRow) -> Self {
        self.masked_row = m;
        self
    }
    /// Sets the algorithm.
    pub fn algorithm(mut self, a: Algorithm) -> Self {
        self.algorithm = a;
        self
    }
    /// Sets the parallelism.
    pub fn par(mut self, p: Par) -> Self {
        self.par = p;
        self
    }
    /// Forces a SIMD level.
    pub fn simd(mut self, l: SimdLevel) -> Self {
        self.simd = Some(l);
        self
    }

    /// `1/τ` in f32 and f64, validated.
    pub(crate) fn inv_temperature(&self, f32_compute: bool) -> Result<(f32, f64)> {
        let t = self.temperature;
        let bad = || Error::BadParameter {
            name: "temperature",
            value: format!("{t}"),
            expected: "finite and > 0, with 1/temperature finite in the compute type",
        };
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
}
