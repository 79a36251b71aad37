//! libFuzzer entry point of the `cross_entropy` target (see the crate docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| smax_fuzz::cross_entropy(data));
