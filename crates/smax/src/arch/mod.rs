//! The SIMD layer: runtime ISA detection, dispatch, and the kernels.
//!
//! Every kernel is written once, generic over [`Isa`] (a [`pulp::Simd`] plus the one thing pulp
//! lacks, a non-temporal store), and instantiated for each instruction set: AVX-512
//! (`pulp::x86::V4`), AVX2+FMA (`pulp::x86::V3`), NEON (`pulp::aarch64::Neon`) and a one-lane
//! scalar fallback (`pulp::Scalar`). The AVX-512 and NEON instances therefore run exactly the
//! kernel bodies that the AVX2 and scalar tests exercise; only pulp's per-ISA primitives differ.
//!
//! The level is chosen once per call ([`SimdLevel::resolve`]): the caller's
//! [`Options::simd`](crate::Options::simd), else the `SMAX_SIMD` environment variable
//! (`scalar`, `avx2`, `avx512`, `neon`; read once per process), else the best level the CPU
//! has. A level the CPU lacks falls back to the best level it has below it.
//!
//! `unsafe` in the crate lives in this module only: the non-temporal stores and the prefetch
//! hints below.
//!
//! Inlining: the kernels' helpers and closures are `#[inline(always)]` in builds without debug
//! assertions, so they compile inside the target-feature region [`dispatch`] opens, and only
//! `#[inline]` with debug assertions. Unoptimised code gets a stack slot per temporary, so
//! forcing the whole kernel into one function at opt-level 0 gives it a frame of megabytes,
//! more than a thread's stack: a debug build would overflow it on the first call (PERF.md,
//! "Debug builds").

pub(crate) mod cols;
pub(crate) mod exp;
pub(crate) mod gemm;
pub(crate) mod half_conv;
pub(crate) mod rows;
pub(crate) mod select;

use pulp::Simd;
use std::sync::OnceLock;

/// An instruction-set level the kernels can run at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimdLevel {
    /// One lane, plain Rust arithmetic with fused multiply-add (`f32::mul_add`). Runs anywhere.
    Scalar,
    /// aarch64 NEON (128-bit).
    Neon,
    /// x86-64 AVX2 + FMA (256-bit; `x86-64-v3`).
    Avx2,
    /// x86-64 AVX-512F/BW/CD/DQ/VL (512-bit; `x86-64-v4`).
    Avx512,
}

impl SimdLevel {
    /// Every level this CPU can run, lowest first.
    pub fn available() -> Vec<SimdLevel> {
        let mut v = vec![SimdLevel::Scalar];
        #[cfg(target_arch = "aarch64")]
        if pulp::aarch64::Neon::try_new().is_some() {
            v.push(SimdLevel::Neon);
        }
        #[cfg(target_arch = "x86_64")]
        {
            if pulp::x86::V3::try_new().is_some() {
                v.push(SimdLevel::Avx2);
            }
            if pulp::x86::V4::try_new().is_some() {
                v.push(SimdLevel::Avx512);
            }
        }
        v
    }

    /// The best level this CPU can run.
    pub fn detected() -> SimdLevel {
        *Self::available().last().unwrap_or(&SimdLevel::Scalar)
    }

    /// Parses `scalar`, `neon`, `avx2` or `avx512` (case-insensitive).
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(SimdLevel::Scalar),
            "neon" => Some(SimdLevel::Neon),
            "avx2" | "v3" => Some(SimdLevel::Avx2),
            "avx512" | "avx-512" | "v4" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    /// The level named by `SMAX_SIMD` if set and valid, else [`SimdLevel::detected`].
    /// Read once per process.
    pub fn default_level() -> SimdLevel {
        static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let wanted = std::env::var("SMAX_SIMD").ok().and_then(|s| SimdLevel::parse(&s));
            match wanted {
                Some(l) => Self::clamp_to_available(l),
                None => Self::detected(),
            }
        })
    }

    /// The best available level that is not above `wanted` on the same architecture.
    fn clamp_to_available(wanted: SimdLevel) -> SimdLevel {
        let avail = Self::available();
        avail.iter().rev().copied().find(|&l| l <= wanted).unwrap_or(SimdLevel::Scalar)
    }

    /// The level a call runs at: `requested` (clamped to what the CPU has) or the default.
    pub fn resolve(requested: Option<SimdLevel>) -> SimdLevel {
        match requested {
            Some(l) => Self::clamp_to_available(l),
            None => Self::default_level(),
        }
    }

    /// Short lowercase name (`scalar`, `neon`, `avx2`, `avx512`).
    pub fn name(&self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Neon => "neon",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }
}

/// A pulp SIMD token plus the stores pulp does not offer.
pub(crate) trait Isa: Simd {
    /// Stores `v` at `dst[..LANES]`, bypassing the cache where the ISA can and `dst` is
    /// aligned to the vector size; a plain store otherwise.
    fn stream_f32s(self, dst: &mut Self::f32s, v: Self::f32s);
    /// Orders earlier non-temporal stores before later stores (a no-op where there are none).
    fn stream_fence(self);
    /// The lanes of `m` as bits (lane `j` at bit `j`). The default selects a power of two per
    /// true lane and sums them, exactly (distinct powers below 2^16); x86 reads the mask
    /// register or `movmskps` instead.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn mask_bits(self, m: Self::m32s) -> u32 {
        let pow: [f32; 16] = core::array::from_fn(|j| (1u32 << j) as f32);
        let v = Self::as_simd_f32s(&pow[..Self::F32_LANES]).0[0];
        self.reduce_sum_f32s(self.select_f32s(m, v, self.splat_f32s(0.0))) as u32
    }
}

/// `Isa` for a token without streaming stores: plain stores, no fence.
macro_rules! plain_stores {
    ($(#[$cfg:meta])* $t:ty) => {
        $(#[$cfg])*
        impl Isa for $t {
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            fn stream_f32s(self, dst: &mut Self::f32s, v: Self::f32s) {
                *dst = v;
            }
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            fn stream_fence(self) {}
        }
    };
}

plain_stores!(pulp::Scalar);
plain_stores!(
    #[cfg(target_arch = "aarch64")]
    pulp::aarch64::Neon
);

/// `Isa` for an x86 token whose vectors are `$bytes` wide, with the non-temporal store
/// `$stream` of the register type `$reg`.
macro_rules! x86_streaming_stores {
    ($t:ty, $reg:ident, $stream:ident, $bytes:literal, |$s:ident, $m:ident| $bits:expr) => {
        #[cfg(target_arch = "x86_64")]
        impl Isa for $t {
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            fn stream_f32s(self, dst: &mut Self::f32s, v: Self::f32s) {
                use core::arch::x86_64::{$reg, $stream};
                let p = dst as *mut Self::f32s as *mut f32;
                if (p as usize).is_multiple_of($bytes) {
                    // SAFETY: `p` points to a live, exclusively borrowed vector of `$bytes` bytes
                    // that we just checked is `$bytes`-byte aligned, as `vmovntps` requires; the
                    // token proves the instructions are present (AVX for `V3`, AVX-512F for
                    // `V4`); the vector and `$reg` are both `$bytes` plain bytes of f32s.
                    unsafe { $stream(p, core::mem::transmute::<Self::f32s, $reg>(v)) }
                } else {
                    *dst = v;
                }
            }
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            fn stream_fence(self) {
                // SAFETY: `sfence` has no memory operands; both x86 tokens imply SSE.
                unsafe { core::arch::x86_64::_mm_sfence() }
            }
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            fn mask_bits(self, $m: Self::m32s) -> u32 {
                let $s = self;
                $bits
            }
        }
    };
}

x86_streaming_stores!(pulp::x86::V3, __m256, _mm256_stream_ps, 32, |s, m| {
    let _ = s;
    // SAFETY: the token proves AVX, which `vmovmskps` needs; `m32x8` is eight 32-bit lanes
    // of all-ones or all-zeros, the same 32 plain bytes as an `__m256`.
    unsafe {
        core::arch::x86_64::_mm256_movemask_ps(core::mem::transmute::<pulp::m32x8, core::arch::x86_64::__m256>(m))
            as u32
    }
});
x86_streaming_stores!(pulp::x86::V4, __m512, _mm512_stream_ps, 64, |s, m| {
    let _ = s;
    // AVX-512 compares produce a 16-bit mask register: its bits are the lanes.
    m.0 as u32
});

/// Identity, so a closure can carry the inlining attribute (attributes are allowed on closures
/// in argument position only). Every closure in a kernel needs it: a closure that is not
/// inlined is compiled outside the target-feature region and its SIMD calls stop inlining.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn inl<F>(f: F) -> F {
    f
}

/// [`inl`] for closures that are called through `&mut`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn inl_mut<F>(f: F) -> F {
    f
}

/// Distance, in elements, that the streaming loops prefetch ahead of the block they work on.
pub(crate) const PREFETCH_AHEAD: usize = 4096;

/// The `(address, bytes)` of a slice, for [`Ahead::with_write`].
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn write_range<T>(out: &[T]) -> (usize, usize) {
    (out.as_ptr() as usize, core::mem::size_of_val(out))
}

/// Where a kernel may prefetch: the bytes from the start of the slice it works on to the end
/// of what its task reads next (the rest of a group of short rows, or the rest of a chunk).
///
/// The hints ([`Ahead::span`]) go into L2 and are spread over the unrolled iterations of the
/// heavy loops, a few lines per iteration, so memory reads run while the arithmetic does.
/// Without hints this machine shows no overlap at all between DRAM reads and the exp
/// arithmetic: each core keeps only a few line fills in flight, and its read time adds to the
/// compute time instead of hiding it. A few `prefetcht1` lines per iteration reach the read
/// roofline where bursts or `prefetcht0` do not (PERF.md, "Prefetching").
#[derive(Clone, Copy)]
pub(crate) struct Ahead<'a> {
    bytes: &'a [u8],
    elem: usize,
    /// Prefetch distance in elements ([`PREFETCH_AHEAD`] unless set).
    dist: usize,
    /// An output range `(address, bytes)` prefetched at the same offsets (0 bytes: none), so
    /// its lines are cached before the stores that will own them. Kept as an address: the
    /// output is mutably borrowed while the hints run.
    write: (usize, usize),
}

impl<'a> Ahead<'a> {
    /// Prefetch nothing.
    pub(crate) const NONE: Ahead<'static> = Ahead { bytes: &[], elem: 1, dist: PREFETCH_AHEAD, write: (0, 0) };

    /// The domain `bytes`, made of elements of `elem` bytes.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub(crate) fn new(bytes: &'a [u8], elem: usize) -> Self {
        Ahead { bytes, elem, dist: PREFETCH_AHEAD, write: (0, 0) }
    }

    /// Also prefetches the same offsets of an output range `(address, bytes)` (see
    /// [`write_range`]): the next row's output lines are in cache before its stores arrive, so
    /// their read-for-ownership does not stall the pass.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub(crate) fn with_write(self, range: (usize, usize)) -> Self {
        Ahead { write: range, ..self }
    }

    /// The same domain with another prefetch distance (for example one row stride: each
    /// iteration then fetches the same offsets of the next row).
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub(crate) fn distance(self, dist: usize) -> Self {
        Ahead { dist, ..self }
    }

    /// The same domain, starting `elems` elements later.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub(crate) fn skip(self, elems: usize) -> Self {
        let b = (elems * self.elem).min(self.bytes.len());
        let wb = b.min(self.write.1);
        Ahead {
            bytes: &self.bytes[b..],
            elem: self.elem,
            dist: self.dist,
            write: (self.write.0 + wb, self.write.1 - wb),
        }
    }

    /// Prefetches into L2 the lines of the `n` elements that start [`PREFETCH_AHEAD`] (or the
    /// set distance) elements after element `at`, as far as the domain reaches, and the same
    /// offsets of the output range of [`Ahead::with_write`]. Called once per unrolled
    /// iteration of a heavy loop, so the hints are spread evenly over the arithmetic.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub(crate) fn span(self, at: usize, n: usize) {
        let start = (at + self.dist) * self.elem;
        if start >= self.bytes.len() {
            return;
        }
        let end = (start + n * self.elem).min(self.bytes.len());
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
            let mut off = start;
            while off < end {
                // SAFETY: `prefetcht1` is a hint that never faults and never writes; the address
                // is inside `self.bytes` (off < end <= len); SSE is part of the x86-64 baseline.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(self.bytes.as_ptr().add(off) as *const i8) };
                off += 64;
            }
            let (wbase, wlen) = self.write;
            let mut off = start;
            while off < end.min(wlen) {
                // SAFETY: as above; the address lies inside the output range of `with_write`.
                unsafe { _mm_prefetch::<_MM_HINT_T1>((wbase + off) as *const i8) };
                off += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = end;
    }
}

/// A kernel body generic over the ISA. `run` must carry the kernels' inlining attribute (see the
/// module docs) so that it is compiled inside the target-feature region [`dispatch`] opens.
pub(crate) trait Task {
    type Output;
    fn run<S: Isa>(self, s: S) -> Self::Output;
}

/// Runs `task` at `level`, inside a region compiled for that instruction set.
#[inline]
pub(crate) fn dispatch<T: Task>(level: SimdLevel, task: T) -> T::Output {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => {
            if let Some(s) = pulp::x86::V4::try_new() {
                return Simd::vectorize(s, Enter { task, s });
            }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            if let Some(s) = pulp::x86::V3::try_new() {
                return Simd::vectorize(s, Enter { task, s });
            }
        }
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => {
            if let Some(s) = pulp::aarch64::Neon::try_new() {
                return Simd::vectorize(s, Enter { task, s });
            }
        }
        _ => {}
    }
    task.run(pulp::Scalar::new())
}

/// Carries the concrete token into `with_simd`, so the task runs on our [`Isa`] type rather
/// than on pulp's generic parameter.
struct Enter<T, S> {
    task: T,
    s: S,
}

impl<T: Task, S: Isa> pulp::WithSimd for Enter<T, S> {
    type Output = T::Output;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn with_simd<S2: Simd>(self, _simd: S2) -> Self::Output {
        self.task.run(self.s)
    }
}
