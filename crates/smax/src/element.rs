//! Element types: f32 and f64, and the half types loaded and stored narrow but computed in f32.

use half::{bf16, f16};

mod sealed {
    /// Sealing: the numerics of each type are documented and tested here.
    pub trait Sealed: Sized + 'static {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// Compiled once: the public API is generic over [`Element`], and Rust compiles a generic
/// function in the crate that instantiates it (with optimisation on, instances are not shared
/// across crates). Without per-type tables every crate that calls `smax::softmax::<f32>` (each
/// integration test, the CLI, every user crate) would compile the whole kernel stack again at
/// every SIMD level. So a family keeps its heavy generic entry points in a table of function
/// pointers instantiated once per element type in a `static` of this crate (statics, not
/// constants: a caller that reads a static links to it and never instantiates what it holds),
/// and its public functions fetch the table for `T` here: a type-id comparison and a call.
///
/// `tables` holds the four statics of one table type, one per element type. Each `Element`
/// is one of those four (the trait is sealed), so the search always finds one.
pub(crate) fn per_type<K: core::any::Any>(tables: [&'static dyn core::any::Any; 4]) -> &'static K {
    match tables.into_iter().find_map(|t| t.downcast_ref::<K>()) {
        Some(k) => k,
        // Unreachable: the caller passes its table at f32, f64, f16 and bf16, and `K` is that
        // table at one of these sealed types.
        None => unreachable!("a kernel table exists for every Element type"),
    }
}

/// How an element type is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[doc(hidden)]
pub enum Repr {
    /// f32: the SIMD kernels, directly on the caller's buffers.
    F32,
    /// f64: the scalar f64 kernels.
    F64,
    /// f16 / bf16: converted to f32 in tiles, computed by the f32 kernels, narrowed once with
    /// round-to-nearest-even on the final store.
    Narrow,
}

/// An element type the kernels accept: `f32`, `f64`, [`half::f16`] or [`half::bf16`].
/// Sealed: the numerics of each type are documented and tested here.
pub trait Element:
    Copy + Send + Sync + Default + PartialEq + core::fmt::Debug + bytemuck::Pod + sealed::Sealed + 'static
{
    /// Short name (`"f32"`, `"f64"`, `"f16"`, `"bf16"`).
    const NAME: &'static str;
    #[doc(hidden)]
    const REPR: Repr;
    /// Widens to f64 (exact for every type).
    fn to_f64(self) -> f64;
    /// Rounds from f64 to nearest (ties to even).
    fn from_f64(v: f64) -> Self;
    /// Converts to f32 (exact for f32, f16 and bf16; rounding for f64).
    fn to_f32(self) -> f32;
    /// Rounds from f32 to nearest (ties to even); exact for f32 and f64.
    fn from_f32(v: f32) -> Self;
    /// The slice itself when `Self` is `U` (the zero-copy paths: `T::cast::<f32>(x)`); `None`
    /// otherwise. The test compares constants (f32 and f64 are the only types of their
    /// [`Repr`]), so it folds away at compile time.
    #[doc(hidden)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn cast<U: Element>(s: &[Self]) -> Option<&[U]> {
        same_type::<Self, U>().then(|| bytemuck::cast_slice(s))
    }
    /// [`Element::cast`] of a mutable slice.
    #[doc(hidden)]
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn cast_mut<U: Element>(s: &mut [Self]) -> Option<&mut [U]> {
        same_type::<Self, U>().then(|| bytemuck::cast_slice_mut(s))
    }
    /// The bytes of a slice (for prefetching).
    #[doc(hidden)]
    fn as_bytes(s: &[Self]) -> &[u8];
    /// Converts a slice to f32 (`dst.len() == src.len()`).
    #[doc(hidden)]
    fn load_f32(src: &[Self], dst: &mut [f32]);
    /// Rounds a slice of f32 into this type (`dst.len() == src.len()`).
    #[doc(hidden)]
    fn store_f32(src: &[f32], dst: &mut [Self]);
}

/// Whether `A` and `U` are the same element type.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn same_type<A: Element, U: Element>() -> bool {
    matches!((A::REPR, U::REPR), (Repr::F32, Repr::F32) | (Repr::F64, Repr::F64))
}

impl Element for f32 {
    const NAME: &'static str = "f32";
    const REPR: Repr = Repr::F32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_bytes(s: &[Self]) -> &[u8] {
        bytemuck::cast_slice(s)
    }
    fn load_f32(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn store_f32(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
}

impl Element for f64 {
    const NAME: &'static str = "f64";
    const REPR: Repr = Repr::F64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn as_bytes(s: &[Self]) -> &[u8] {
        bytemuck::cast_slice(s)
    }
    fn load_f32(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s as f32;
        }
    }
    fn store_f32(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s as f64;
        }
    }
}

/// `v` rounded to f32 by round-to-odd: toward zero, with the last bit set when inexact. Rounding
/// that to nearest in a type at least two bits narrower (f16, bf16) gives `v` correctly rounded
/// to that type (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved
/// algorithms using rounding to odd", IEEE TC 2008). A plain `v as f32` first can turn a value
/// just off a tie of the narrow type into an exact tie: `half::bf16::from_f64` rounds the f64
/// value of the f32 `0x311a8006` down to `0x311a` (the nearest is `0x311b`).
fn f32_round_to_odd(v: f64) -> f32 {
    let f = v as f32;
    // Exact, NaN, or beyond the f32 range (then ±inf, which is also the narrow result).
    if !f.is_finite() || f as f64 == v {
        return f;
    }
    // `f` is inexact: step toward zero if it rounded away (`f ≠ 0` then, so the step stays on
    // the same side of zero), and set the sticky bit.
    let t = if (f as f64).abs() > v.abs() { f.to_bits() - 1 } else { f.to_bits() };
    f32::from_bits(t | 1)
}

macro_rules! narrow {
    ($t:ty, $name:literal, $load:ident, $store:ident) => {
        impl Element for $t {
            const NAME: &'static str = $name;
            const REPR: Repr = Repr::Narrow;
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            fn from_f64(v: f64) -> Self {
                <$t>::from_f32(f32_round_to_odd(v))
            }
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
            fn as_bytes(s: &[Self]) -> &[u8] {
                bytemuck::cast_slice(s)
            }
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            fn load_f32(src: &[Self], dst: &mut [f32]) {
                $load(src, dst)
            }
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            fn store_f32(src: &[f32], dst: &mut [Self]) {
                $store(src, dst)
            }
        }
    };
}
narrow!(f16, "f16", f16_load, f16_store);
narrow!(bf16, "bf16", bf16_load, bf16_store);

/// f16 → f32, exact (a NaN is quieted, as `f16::to_f32` does). With F16C (`arch::half_conv`,
/// eight lanes per instruction); otherwise branch-free software that vectorizes inside the
/// caller's SIMD region, subnormals through one exact f32 subtraction (Giesen's method).
/// (`half`'s slice conversion is an outlined call of 4-lane steps per tile, slower here.)
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn f16_load(src: &[f16], dst: &mut [f32]) {
    crate::arch::half_conv::f16_to_f32(src, dst, f16_load_soft)
}

/// [`f16_load`] in software (CPUs without F16C).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn f16_load_soft(src: &[f16], dst: &mut [f32]) {
    map(src, dst, |h| f32::from_bits(f16_to_f32_bits(h.to_bits())))
}

/// `dst[i] = f(src[i])`: a plain loop, which vectorizes inside the caller's SIMD region.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn map<A: Copy, B>(src: &[A], dst: &mut [B], f: impl Fn(A) -> B) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(s);
    }
}

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn f16_to_f32_bits(h: u16) -> u32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = (h & 0x7FFF) << 13; // exponent and mantissa, in f32 position
    let exp = em & 0x0F80_0000;
    let normal = em + ((127 - 15) << 23);
    let quiet = if em & 0x007F_E000 != 0 { 0x0040_0000 } else { 0 };
    let inf_nan = (em + ((255 - 31) << 23)) | quiet;
    // m · 2⁻²⁴ = (2⁻¹⁴ + m · 2⁻²⁴) − 2⁻¹⁴, both exact in f32.
    let magic = f32::from_bits(113 << 23);
    let sub = (f32::from_bits(em + (113 << 23)) - magic).to_bits();
    let v = if exp == 0x0F80_0000 {
        inf_nan
    } else if exp == 0 {
        sub
    } else {
        normal
    };
    v | sign
}

/// f32 → f16, round to nearest, ties to even; overflow to ±inf; NaN stays NaN (quiet bit set,
/// the high payload bits kept). Bit for bit `f16::from_f32` (tested on every rounding boundary,
/// both paths). With F16C as [`f16_load`]; otherwise branch-free software, subnormal results
/// rounded through one f32 addition of 0.5, whose ulp is the f16 subnormal step 2⁻²⁴
/// (Giesen's method).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn f16_store(src: &[f32], dst: &mut [f16]) {
    crate::arch::half_conv::f32_to_f16(src, dst, f16_store_soft)
}

/// [`f16_store`] in software (CPUs without F16C).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn f16_store_soft(src: &[f32], dst: &mut [f16]) {
    map(src, dst, |v| f16::from_bits(f32_to_f16_bits(v)))
}

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn f32_to_f16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7FFF_FFFF;
    let nan = 0x7E00 | ((a & 0x007F_FFFF) >> 13);
    const HALF: u32 = 126 << 23; // 0.5f
    let sub = (f32::from_bits(a) + f32::from_bits(HALF)).to_bits().wrapping_sub(HALF);
    // Rebias 127 → 15 and round to nearest even at bit 13.
    let norm = a.wrapping_add(((15 - 127) << 23) as u32).wrapping_add(0xFFF + ((a >> 13) & 1)) >> 13;
    let h = if a > 0x7F80_0000 {
        nan
    } else if a >= 0x4780_0000 {
        0x7C00 // ≥ 65536 (and inf); 65520 ≤ |v| < 65536 rounds there through `norm`
    } else if a < 0x3880_0000 {
        sub // below 2⁻¹⁴: subnormal or zero
    } else {
        norm
    };
    (h | sign) as u16
}

/// bf16 → f32 is exact: the bf16 bits are the high half of the f32 (a NaN is quieted, as
/// `bf16::to_f32` does). A plain loop, inlined into the caller's SIMD region, where it
/// vectorizes (`half`'s slice conversion is a scalar call).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn bf16_load(src: &[bf16], dst: &mut [f32]) {
    map(src, dst, |s| {
        let b = s.to_bits();
        let b = if (b & 0x7FFF) > 0x7F80 { b | 0x0040 } else { b };
        f32::from_bits((b as u32) << 16)
    })
}

/// f32 → bf16, round to nearest, ties to even; NaN stays NaN (quieted, sign and high payload
/// kept), overflow rounds to ±inf. Bit for bit `bf16::from_f32` (tested over every rounding
/// boundary), written branch-free so it vectorizes inside the caller's SIMD region.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn bf16_store(src: &[f32], dst: &mut [bf16]) {
    map(src, dst, |v| {
        let x = v.to_bits();
        let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
        let nan = ((x >> 16) as u16) | 0x0040;
        bf16::from_bits(if (x & 0x7FFF_FFFF) > 0x7F80_0000 { nan } else { rounded })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `from_f64` against the definition at every tie of both narrow types: the tie itself goes
    /// to the even neighbour, one f64 ulp either side to the nearer one; and every value
    /// converts to itself.
    #[test]
    fn from_f64_rounds_to_nearest_at_every_tie() {
        fn check<T: Element>(bits: impl Fn(u16) -> T, max: u16) {
            for b in 0..max {
                let (lo, hi) = (bits(b), bits(b + 1));
                let (l, h) = (lo.to_f64(), hi.to_f64());
                if !h.is_finite() {
                    continue;
                }
                let mid = (l + h) / 2.0; // exact in f64
                let even = if b & 1 == 0 { l } else { h };
                for (v, want) in [(l, l), (mid, even), (mid.next_down(), l), (mid.next_up(), h)] {
                    for sign in [1.0, -1.0] {
                        let got = T::from_f64(sign * v).to_f64();
                        assert_eq!(got.to_bits(), (sign * want).to_bits(), "{} {:e}", T::NAME, sign * v);
                    }
                }
            }
        }
        check(bf16::from_bits, 0x7F80);
        check(f16::from_bits, 0x7C00);
    }

    #[test]
    fn f16_conversions_match_half_at_every_boundary() {
        // Every f16 value, the f32s just around it, the ties between it and the next value
        // and one f32 ulp either side of each tie; f32 subnormals; specials; a random sweep.
        let mut src = Vec::new();
        for h in 0..=0x7FFFu16 {
            let a = f16::from_bits(h).to_f32();
            let b = f16::from_bits(h + 1).to_f32();
            let mid = ((a as f64 + b as f64) / 2.0) as f32;
            for v in [a, b, mid] {
                if v.is_finite() {
                    let u = v.to_bits();
                    for w in [u.wrapping_sub(1), u, u + 1] {
                        src.push(f32::from_bits(w));
                        src.push(-f32::from_bits(w));
                    }
                }
            }
        }
        for u in (0..0x0080_0000u32).step_by(997).chain([1, 0x7F_FFFF]) {
            src.push(f32::from_bits(u));
        }
        src.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::MAX, f32::MIN]);
        src.extend([f32::from_bits(0x7F80_0001), f32::from_bits(0xFFBF_FFFF), 65519.0, 65520.0, 65535.9]);
        let mut r = 0x9E37_79B9u32;
        for _ in 0..1 << 20 {
            r ^= r << 13;
            r ^= r >> 17;
            r ^= r << 5;
            src.push(f32::from_bits(r));
        }
        // Both paths: the dispatching one (F16C where the CPU has it) and the software one.
        // Odd lengths exercise the F16C tail.
        type Store = fn(&[f32], &mut [f16]);
        let stores: [(&str, Store); 2] = [("dispatch", f16_store), ("software", f16_store_soft)];
        for (name, store) in stores {
            let mut got = vec![f16::ZERO; src.len()];
            store(&src, &mut got);
            let mut tail = vec![f16::ZERO; 13];
            store(&src[..13], &mut tail);
            for (v, g) in src.iter().zip(&got).chain(src.iter().zip(&tail)) {
                assert_eq!(g.to_bits(), f16::from_f32(*v).to_bits(), "{name}: f32 bits {:#010x}", v.to_bits());
            }
        }
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        type Load = fn(&[f16], &mut [f32]);
        let loads: [(&str, Load); 2] = [("dispatch", f16_load), ("software", f16_load_soft)];
        for (name, load) in loads {
            let mut wide = vec![0.0f32; all.len()];
            load(&all, &mut wide);
            let mut tail = vec![0.0f32; 13];
            load(&all[0x7BF0..0x7BF0 + 13], &mut tail);
            let pairs = all.iter().zip(&wide).chain(all[0x7BF0..].iter().zip(&tail));
            for (h, w) in pairs {
                assert_eq!(w.to_bits(), h.to_f32().to_bits(), "{name}: f16 bits {:#06x}", h.to_bits());
            }
        }
    }

    /// Every bf16 value, and every f32 on and around each rounding boundary between two of
    /// them (the tie, one below, one above, the ends of the interval), against `half`.
    #[test]
    fn bf16_conversions_match_half_at_every_boundary() {
        let mut src = Vec::new();
        for hi in 0..=u16::MAX as u32 {
            for lo in [0u32, 1, 0x3FFF, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFE, 0xFFFF] {
                src.push(f32::from_bits(hi << 16 | lo));
            }
        }
        let mut got = vec![bf16::ZERO; src.len()];
        bf16_store(&src, &mut got);
        for (v, g) in src.iter().zip(&got) {
            assert_eq!(g.to_bits(), bf16::from_f32(*v).to_bits(), "f32 bits {:#010x}", v.to_bits());
        }
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut wide = vec![0.0f32; all.len()];
        bf16_load(&all, &mut wide);
        for (b, w) in all.iter().zip(&wide) {
            assert_eq!(w.to_bits(), b.to_f32().to_bits(), "bf16 bits {:#06x}", b.to_bits());
        }
    }
}
