//! Element types: f32 and f64, and the half types loaded and stored narrow but computed in f32.

use half::{bf16, f16};

mod sealed {
    use crate::mono::{self, Kernels};

    /// Sealing, and the table of compiled kernels for the type (see [`crate::mono`]).
    pub trait Sealed: Sized + 'static {
        fn kernels() -> &'static Kernels<Self>;
    }
    impl Sealed for f32 {
        fn kernels() -> &'static Kernels<Self> {
            &mono::F32
        }
    }
    impl Sealed for f64 {
        fn kernels() -> &'static Kernels<Self> {
            &mono::F64
        }
    }
    impl Sealed for half::f16 {
        fn kernels() -> &'static Kernels<Self> {
            &mono::F16
        }
    }
    impl Sealed for half::bf16 {
        fn kernels() -> &'static Kernels<Self> {
            &mono::BF16
        }
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
    #[doc(hidden)]
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    #[doc(hidden)]
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
    #[doc(hidden)]
    fn as_f64(s: &[Self]) -> Option<&[f64]>;
    #[doc(hidden)]
    fn as_f64_mut(s: &mut [Self]) -> Option<&mut [f64]>;
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
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
    fn as_f64(_: &[Self]) -> Option<&[f64]> {
        None
    }
    fn as_f64_mut(_: &mut [Self]) -> Option<&mut [f64]> {
        None
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
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    fn as_f64(s: &[Self]) -> Option<&[f64]> {
        Some(s)
    }
    fn as_f64_mut(s: &mut [Self]) -> Option<&mut [f64]> {
        Some(s)
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

macro_rules! narrow {
    ($t:ty, $name:literal) => {
        impl Element for $t {
            const NAME: &'static str = $name;
            const REPR: Repr = Repr::Narrow;
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
            fn as_f32(_: &[Self]) -> Option<&[f32]> {
                None
            }
            fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
                None
            }
            fn as_f64(_: &[Self]) -> Option<&[f64]> {
                None
            }
            fn as_f64_mut(_: &mut [Self]) -> Option<&mut [f64]> {
                None
            }
            fn as_bytes(s: &[Self]) -> &[u8] {
                bytemuck::cast_slice(s)
            }
            fn load_f32(src: &[Self], dst: &mut [f32]) {
                use half::slice::HalfFloatSliceExt;
                src.convert_to_f32_slice(dst)
            }
            fn store_f32(src: &[f32], dst: &mut [Self]) {
                use half::slice::HalfFloatSliceExt;
                dst.convert_from_f32_slice(src)
            }
        }
    };
}
narrow!(f16, "f16");
narrow!(bf16, "bf16");
