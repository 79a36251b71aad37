//! libFuzzer entry point of the `attention` target (see the crate docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| smax_fuzz::attention(data));
