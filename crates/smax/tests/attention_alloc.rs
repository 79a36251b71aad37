//! Attention never allocates anything that grows with `q_len × kv_len`: a counting global
//! allocator records the high-water mark of live heap bytes during forward and backward calls.

use smax::Par;
use smax::attention::{AttentionGrads, AttentionOptions, AttentionShape, Heads, attention, attention_backward};
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

/// Peak extra heap bytes of one forward and of one backward call (single-threaded, so the
/// number does not depend on how many tasks run at once).
fn peaks(q_len: usize, kv_len: usize) -> (usize, usize) {
    let s = AttentionShape::new(1, 2, q_len, kv_len, 32);
    let q: Vec<f32> = (0..s.out_len()).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let k: Vec<f32> = (0..s.kv_len_elems()).map(|i| ((i * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let v = k.clone();
    let mut out = vec![0.0f32; s.out_len()];
    let mut lse = vec![0.0f32; s.lse_len()];
    let d_out = q.clone();
    let (mut dq, mut dk, mut dv) =
        (vec![0.0f32; s.out_len()], vec![0.0f32; s.kv_len_elems()], vec![0.0f32; s.kv_len_elems()]);
    let o = AttentionOptions::default().causal(true).par(Par::Seq);
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    attention(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
        &o,
    )
    .unwrap();
    let fwd = PEAK.load(Ordering::SeqCst) - before;
    PEAK.store(before, Ordering::SeqCst);
    attention_backward(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        &out,
        &lse,
        &d_out,
        AttentionGrads::new(&mut dq, &mut dk, &mut dv),
        &o,
    )
    .unwrap();
    let bwd = PEAK.load(Ordering::SeqCst) - before;
    (fwd, bwd)
}

#[test]
fn attention_memory_does_not_grow_with_the_score_matrix() {
    // Warm-up: `gemm` allocates its thread-local packing buffers on first use.
    peaks(300, 300);
    let (f_small, b_small) = peaks(512, 512);
    let (f_long_kv, b_long_kv) = peaks(512, 8192);
    let (f_big, b_big) = peaks(4096, 4096);
    // The forward's working set is its tiles: the same for every length, up to the task list
    // (one entry per query block).
    assert_eq!(f_small, f_long_kv, "forward peak grew with kv_len");
    assert!(f_big <= f_small + (16 << 10), "forward peak grew with q_len: {f_big} vs {f_small}");
    // The backward keeps O(q_len · d) per (batch, kv head) (the dQ accumulator and D), never
    // O(q_len · kv_len): 16× more keys add nothing, 8× more queries add at most 8×.
    assert_eq!(b_small, b_long_kv, "backward peak grew with kv_len");
    assert!(b_big <= 8 * b_small, "backward peak {b_big} vs {b_small}");
    // And both stay far below one score matrix (4096² f32 = 64 MiB).
    assert!(f_big < 1 << 20 && b_big < 4 << 20, "forward {f_big} B, backward {b_big} B");
}
