//! Working memory whose size follows from a count the caller passes (bins, classes, splits, a
//! head dimension, a token count) gives a typed error when that size cannot exist, never a
//! "capacity overflow" panic or an allocation abort (issue "No panic", class 4).
//!
//! Every size asked for here is beyond 2^47 bytes, the address space of x86-64 user space, so
//! the allocator refuses it whatever the system's overcommit policy; the inputs themselves stay
//! small.

use smax::attention::{
    AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, Heads, Inline, InlineKernel, SplitK,
    attention_decode, inline_attention,
};
use smax::calibrate::{Binning, CalibrationOptions, MahalanobisOptions, calibration_error, mahalanobis_fit};
use smax::loss::{LinearCeScratch, LinearShape, LinearTiles};
use smax::{Error, Par, View};

fn is_size_error<T: std::fmt::Debug>(r: &smax::Result<T>) -> bool {
    matches!(r, Err(Error::Allocation { .. }) | Err(Error::SizeOverflow { .. }))
}

#[test]
fn calibration_bins_beyond_memory_are_an_error() {
    let z = [1.0f64, 0.0, 0.0, 1.0];
    for binning in [Binning::EqualWidth(usize::MAX), Binning::EqualMass(usize::MAX), Binning::EqualWidth(1 << 60)] {
        let r = calibration_error(
            View::rows(&z, 2, 2).unwrap(),
            &[0, 1],
            &CalibrationOptions { binning, ..Default::default() },
        );
        assert!(is_size_error(&r), "{binning:?}: {r:?}");
    }
    // More bins than samples is valid (equal mass skips the empty ones): the bound is memory.
    let ok = CalibrationOptions { binning: Binning::EqualMass(1000), ..Default::default() };
    let c = calibration_error(View::rows(&z, 2, 2).unwrap(), &[0, 1], &ok).unwrap();
    assert_eq!(c.bins.iter().map(|b| b.count).sum::<usize>(), 2);
}

#[test]
fn mahalanobis_sizes_from_counts_are_errors() {
    // More classes than samples: some class has no sample, said before any per-class buffer.
    let f = [0.5f64, 1.5];
    let r = mahalanobis_fit(&f, 1, &[0, 0], usize::MAX, &MahalanobisOptions::default());
    assert!(matches!(r, Err(Error::BadParameter { name: "labels", .. })), "{r:?}");
    // One sample of dimension 2^23: the covariance would hold 2^46 f64 (2^49 bytes).
    let dim = 1usize << 23;
    let f = vec![0.25f64; dim];
    let r = mahalanobis_fit(&f, dim, &[0], 1, &MahalanobisOptions::default());
    assert!(matches!(r, Err(Error::Allocation { what: "covariance", .. })), "{r:?}");
}

#[test]
fn gate_statistics_for_absurd_expert_counts_are_an_error() {
    // Found by the `sampling` fuzz target: no tokens, rows of 2^61 experts (a valid empty
    // layout); the per-expert statistics asked for 2^61 entries.
    use smax::gate::{GateOptions, gate};
    let x: [f32; 0] = [];
    let v = View::new(&x[..], smax::Layout::rows(0, 1 << 61)).unwrap();
    let r = gate(v, None, &mut [], &mut [], &GateOptions::default());
    assert!(matches!(r, Err(Error::Allocation { .. })), "{r:?}");
}

#[test]
fn linear_scratch_for_absurd_token_counts_is_an_error() {
    let shape = LinearShape { n: usize::MAX, d: 1, v: 1 };
    let r = LinearCeScratch::new(shape, LinearTiles::default());
    assert!(is_size_error(&r), "{r:?}");
    let r = LinearCeScratch::new(LinearShape { n: 1 << 50, d: 1, v: 1 }, LinearTiles::default());
    assert!(is_size_error(&r), "{r:?}");
    // A real one still builds.
    assert!(LinearCeScratch::new(LinearShape { n: 4, d: 2, v: 3 }, LinearTiles::default()).is_ok());
    assert_eq!(
        smax::loss::linear_cross_entropy_scratch_bytes(shape, LinearTiles::default()),
        usize::MAX,
        "the byte count saturates"
    );
}

#[test]
fn split_k_with_more_partials_than_memory_is_an_error() {
    // A long prefill (2^23 queries over 2^23 keys, head dim 1) split one key per split:
    // 2^46 f32 partials (2^48 bytes).
    let n = 1usize << 23;
    let (q, k, v) = (vec![0.5f32; n], vec![0.25f32; n], vec![1.0f32; n]);
    let mut out = vec![0.0f32; n];
    let s = AttentionShape::new(1, 1, n, n, 1);
    let opts = AttentionOptions::default().with_variant(SplitK { split_len: 1 }).par(Par::Seq);
    let r = attention_decode(
        AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        AttentionOutputs::new(&mut out, None),
        &opts,
    );
    assert!(matches!(r, Err(Error::Allocation { .. })), "{r:?}");
}

#[test]
fn inline_attention_head_dim_beyond_memory_is_an_error() {
    // One query, one key, head dim 2^23: the d x d matrix KV would be 2^46 f32 (2^48 bytes).
    let d = 1usize << 23;
    let x = vec![0.5f32; d];
    let mut out = vec![0.0f32; d];
    let s = AttentionShape::new(1, 1, 1, 1, d);
    let opts =
        AttentionOptions::default().with_variant(Inline { kernel: InlineKernel::Identity, local: None }).par(Par::Seq);
    let r = inline_attention(AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)), &mut out, &opts);
    assert!(matches!(r, Err(Error::Allocation { what: "inline KV", .. })), "{r:?}");
}
