//! The linear cross-entropy's peak allocation does not grow with the vocabulary: a counting
//! global allocator records the high-water mark of live heap bytes during one call.

use smax::loss::{LinearCrossEntropyOptions, LinearGrads, LinearInputs, LinearShape, RowOutputs, linear_cross_entropy};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator unchanged; the counters are only
// bookkeeping on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::SeqCst) + l.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak heap bytes allocated during one call beyond what was live before it.
fn peak_extra(n: usize, d: usize, v: usize) -> usize {
    let h: Vec<f32> = (0..n * d).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let w: Vec<f32> = (0..v * d).map(|i| ((i * 104_729) % 1000) as f32 / 2000.0 - 0.25).collect();
    let y: Vec<i64> = (0..n).map(|i| ((i * 31) % v) as i64).collect();
    let mut dh = vec![0.0f32; n * d];
    let mut dw = vec![0.0f32; v * d];
    let mut run = || {
        linear_cross_entropy(
            LinearShape { n, d, v },
            LinearInputs { h: &h, w: &w, bias: None, targets: &y },
            LinearGrads { dh: Some(&mut dh), dw: Some(&mut dw), dbias: None },
            RowOutputs::default(),
            None,
            &LinearCrossEntropyOptions::default(),
        )
        .unwrap()
    };
    run(); // warm-up: thread pools and per-thread packing buffers
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    std::hint::black_box(run());
    PEAK.load(Ordering::SeqCst) - before
}

#[test]
fn peak_allocation_does_not_grow_with_vocabulary() {
    let (n, d) = (256, 64);
    let small = peak_extra(n, d, 4096);
    let large = peak_extra(n, d, 65536);
    let materialized = n * 65536 * 4;
    eprintln!("peak extra bytes: V=4096 {small}, V=65536 {large} (materialized logits at V=65536: {materialized})");
    // The same tiles at both sizes; the allocator may round differently by a few pages.
    assert!(large <= small + 64 * 1024, "peak grew with V: {small} -> {large}");
    assert!(large * 16 <= materialized, "{large} is not small next to {materialized}");
}
