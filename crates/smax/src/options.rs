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
    /// Chosen by row length from measurements on AVX2/AVX-512 machines (see
    /// [`Algorithm::resolve`]).
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
    /// redo pass 1 with [`Algorithm::Online`].
    TwoPass,
    /// The online normaliser (Milakov & Gimelshein 2018), blocked: a running `(max, Σ)` state
    /// updated once per block of 256 elements, then the write pass. Two reads, one write.
    Online,
}

impl Algorithm {
    /// The algorithm `Auto` resolves to for rows of `len` elements when nothing else is known
    /// (logsumexp, and softmax/log-softmax calls whose output fits in cache):
    /// [`Algorithm::ThreePass`] for rows that one core processes whole (≤ 256 Ki elements, one
    /// chunk: its second and third passes read from that core's L2), the one-read-less
    /// [`Algorithm::Online`] for longer rows, whose chunks are spread over threads. Measured
    /// with `smax bench` on an AVX-512 machine (three-pass 0.67 vs online 0.59 of the copy
    /// roofline at 512x131072; online 0.47 vs three-pass 0.35 at 64x1048576, 2 threads,
    /// before the online pass was pipelined across rows).
    pub fn resolve(self, len: usize) -> Algorithm {
        match self {
            Algorithm::Auto => {
                if len <= AUTO_THREE_PASS_MAX {
                    Algorithm::ThreePass
                } else {
                    Algorithm::Online
                }
            }
            a => a,
        }
    }

    /// The algorithm `Auto` resolves to for a softmax or log-softmax call with rows of `len`
    /// elements and an output of `out_bytes`: when the output is too large to stay in cache
    /// (≥ 32 MiB, where it is written with non-temporal stores) and rows are longer than
    /// 64 Ki elements, [`Algorithm::Online`], whose f32 write pass over each row also runs the
    /// online pass over the next row (software pipelining: two reads and a write overlap in
    /// one loop, as in a triad); otherwise [`Algorithm::resolve`]. Measured with `smax bench`,
    /// 2 threads, AVX-512: pipelined online 0.71 vs three-pass 0.65 of the copy roofline at
    /// 512x131072, level at 2048x32768, three-pass ahead by 0-3 % at 16384x4096 and
    /// 65536x1024 (where three-pass prefetches the next row and its output instead).
    pub fn resolve_forward(self, len: usize, out_bytes: usize) -> Algorithm {
        match self {
            Algorithm::Auto if out_bytes >= crate::forward::STREAM_MIN_BYTES && len > PIPELINE_MIN_LEN => {
                Algorithm::Online
            }
            a => a.resolve(len),
        }
    }
}

/// Rows longer than this go through the pipelined online algorithm in large calls.
pub(crate) const PIPELINE_MIN_LEN: usize = 64 * 1024;

pub(crate) const AUTO_THREE_PASS_MAX: usize = crate::par::CHUNK;

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
