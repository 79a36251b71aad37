//! Fuzz targets for smax, one per public family. Each target decodes arbitrary bytes into
//! shapes, strides, parameters and values (NaN, ±inf, subnormals, ±f32::MAX, huge and zero
//! sizes), calls the public API, and checks its oracles:
//!
//! - no panic, no abort (an `Err` is a valid answer to bad input);
//! - an `Ok` result obeys the documented special-value rules where they are cheap to state
//!   (softmax rows: the README's special-value table, finite rows sum to 1; sampled tokens are
//!   in range and unmasked; gated experts are distinct and in range);
//! - results are bitwise identical on one thread and on the rayon pool.
//!
//! `fuzz_targets/` holds the libFuzzer entry points (`cargo fuzz run <target> --features
//! libfuzzer`); `tests/replay.rs` replays the checked-in corpus (`corpus/<target>/`) and a
//! fixed set of generated inputs through the same functions in an ordinary `cargo test`.

mod input;
mod targets;

pub use targets::{attention, calibrate, cross_entropy, normalizers, sampling};

/// A fuzz target: takes the fuzzer's bytes, panics on a failed oracle.
pub type Target = fn(&[u8]);

/// The targets by name, for the replay test.
pub const TARGETS: [(&str, Target); 5] = [
    ("normalizers", normalizers),
    ("cross_entropy", cross_entropy),
    ("attention", attention),
    ("sampling", sampling),
    ("calibrate", calibrate),
];
