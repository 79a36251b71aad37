//! f16 ↔ f32 tile conversion with the F16C instructions (`vcvtph2ps` / `vcvtps2ph`, eight
//! lanes per step) where the CPU has them. The callers fall back to their branch-free software
//! conversion (same bits: IEEE round-to-nearest-even, NaN quieted with its high payload kept,
//! which is what F16C does) where the CPU lacks them. The choice follows the CPU, not the
//! SIMD level a call runs at (`SMAX_SIMD=scalar` included): both give the same bits, and the
//! unit tests in `element.rs` check each against `half` on every rounding boundary.

/// Defines `$name(src, dst, soft)`: `$fast` (compiled for AVX and F16C) where the CPU has both,
/// else `soft`, the caller's software conversion (the same bits).
macro_rules! with_f16c {
    ($(#[$doc:meta])* $name:ident, $fast:ident, $from:ty, $to:ty) => {
        $(#[$doc])*
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        pub(crate) fn $name(src: &[$from], dst: &mut [$to], soft: impl FnOnce(&[$from], &mut [$to])) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
                // SAFETY: the CPU has F16C and AVX, the features `$fast` is compiled for.
                unsafe { $fast(src, dst) };
                return;
            }
            soft(src, dst)
        }
    };
}

with_f16c!(
    /// `dst[i] = src[i] as f32` (exact).
    f16_to_f32,
    f16_to_f32_f16c,
    half::f16,
    f32
);
with_f16c!(
    /// `dst[i] = f16::from_f32(src[i])` (round to nearest even).
    f32_to_f16,
    f32_to_f16_f16c,
    f32,
    half::f16
);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn f16_to_f32_f16c(src: &[half::f16], dst: &mut [f32]) {
    use core::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` bounds both accesses: 16 bytes read from `src[i..i + 8]` and
        // 32 bytes written to `dst[i..i + 8]`; unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i).cast::<__m128i>());
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    if i < n {
        // The tail through an 8-lane stack buffer (padding converts to 0 and is dropped).
        let mut hb = [half::f16::ZERO; 8];
        let mut fb = [0.0f32; 8];
        hb[..n - i].copy_from_slice(&src[i..n]);
        // SAFETY: both buffers are 8 lanes long.
        unsafe {
            let h = _mm_loadu_si128(hb.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(fb.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
        dst[i..n].copy_from_slice(&fb[..n - i]);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn f32_to_f16_f16c(src: &[f32], dst: &mut [half::f16]) {
    use core::arch::x86_64::{__m128i, _MM_FROUND_TO_NEAREST_INT, _mm_storeu_si128, _mm256_cvtps_ph, _mm256_loadu_ps};
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` bounds both accesses: 32 bytes read from `src[i..i + 8]` and
        // 16 bytes written to `dst[i..i + 8]`; unaligned loads and stores.
        unsafe {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            _mm_storeu_si128(
                dst.as_mut_ptr().add(i).cast::<__m128i>(),
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v),
            );
        }
        i += 8;
    }
    if i < n {
        let mut fb = [0.0f32; 8];
        let mut hb = [half::f16::ZERO; 8];
        fb[..n - i].copy_from_slice(&src[i..n]);
        // SAFETY: both buffers are 8 lanes long.
        unsafe {
            let v = _mm256_loadu_ps(fb.as_ptr());
            _mm_storeu_si128(hb.as_mut_ptr().cast::<__m128i>(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
        }
        dst[i..n].copy_from_slice(&hb[..n - i]);
    }
}
