//! libFuzzer entry point of the `normalizers` target (see the crate docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| smax_fuzz::normalizers(data));
