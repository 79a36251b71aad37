//! The filter chain of one row (top-k, top-p, min-p, typical, η, ε...): which tokens stay
//! and their renormalised weights, over sort keys that order by value then index.

use super::*;

/// Total-order key: larger key = earlier in the order (t descending, then index ascending).
#[inline]
pub(super) fn key(t: f64, i: usize) -> u128 {
    // (+ 0.0 turns −0 into +0, so the two zeros tie.)
    let b = (t + 0.0).to_bits();
    let ord = if b >> 63 == 1 { !b } else { b | (1 << 63) };
    ((ord as u128) << 64) | (u64::MAX - i as u64) as u128
}

#[inline]
pub(super) fn key_index(k: u128) -> usize {
    (u64::MAX - k as u64) as usize
}

/// The kept set of one row: tokens with key ≥ `cut` that pass min-p.
pub(super) struct Kept {
    cut: u128,
    /// `cut` decoded: its value and index.
    cut_v: f64,
    cut_i: usize,
    /// `exp(t_i − t_max) ≥ min_p` is required too (None: no min-p).
    min_p: Option<f64>,
    /// `ln(min_p)`, for a cheap pre-test far from the boundary.
    ln_min_p: f64,
    pub(super) t_max: f64,
}

/// The value of a key (inverse of the order-preserving bit map in [`key`]).
#[inline]
pub(super) fn key_value(k: u128) -> f64 {
    let ord = (k >> 64) as u64;
    f64::from_bits(if ord >> 63 == 1 { ord & !(1 << 63) } else { !ord })
}

impl Kept {
    fn set_cut(&mut self, cut: u128) {
        self.cut = cut;
        self.cut_v = key_value(cut);
        self.cut_i = key_index(cut);
    }

    #[inline]
    pub(super) fn has(&self, t: f64, i: usize) -> bool {
        // key(t, i) ≥ cut, compared as (value, index) without building the key.
        t != f64::NEG_INFINITY && (t > self.cut_v || (t == self.cut_v && i <= self.cut_i)) && self.passes_min_p(t)
    }

    /// The min-p test `exp(t − t_max) ≥ min_p`, evaluated exactly as written only near its
    /// boundary (libm's `exp` is within 1 ULP, far below the 1e-9 margin).
    #[inline]
    fn passes_min_p(&self, t: f64) -> bool {
        let Some(mp) = self.min_p else { return true };
        let d = t - self.t_max;
        if d < self.ln_min_p - 1e-9 {
            false
        } else if d > self.ln_min_p + 1e-9 {
            true
        } else {
            d.exp() >= mp
        }
    }
}

/// The `c` largest keys of `it` (unordered): a min-heap of size `c` for small `c` (one pass,
/// most keys rejected by one comparison), else collect and select.
pub(super) fn top_keys(it: impl Iterator<Item = u128>, c: usize) -> Vec<u128> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    if c == 0 {
        return Vec::new();
    }
    if c <= 4096 {
        let mut heap: BinaryHeap<Reverse<u128>> = BinaryHeap::with_capacity(c + 1);
        for kk in it {
            if heap.len() < c {
                heap.push(Reverse(kk));
            } else if let Some(mut top) = heap.peek_mut() {
                if kk > top.0 {
                    *top = Reverse(kk);
                }
            }
        }
        heap.into_iter().map(|r| r.0).collect()
    } else {
        let mut all: Vec<u128> = it.collect();
        if c < all.len() {
            all.select_nth_unstable_by(c - 1, |a, b| b.cmp(a));
            all.truncate(c);
        }
        all
    }
}

/// The key of the k-th token in the order (`k ≤` the unmasked count): a size-k min-heap over
/// one pass that rejects most values by one f64 comparison with the heap's smallest value.
pub(super) fn top_k_key(t: &[f64], k: usize) -> u128 {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    if k > 4096 {
        let mut all: Vec<u128> =
            t.iter().enumerate().filter(|(_, v)| **v != f64::NEG_INFINITY).map(|(i, &v)| key(v, i)).collect();
        all.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        return all[k - 1];
    }
    let mut heap: BinaryHeap<Reverse<u128>> = BinaryHeap::with_capacity(k + 1);
    let mut thr = f64::NEG_INFINITY;
    for (i, &v) in t.iter().enumerate() {
        if v == f64::NEG_INFINITY || (heap.len() == k && v < thr) {
            continue;
        }
        let kk = key(v, i);
        if heap.len() < k {
            heap.push(Reverse(kk));
        } else if let Some(mut top) = heap.peek_mut() {
            if kk > top.0 {
                *top = Reverse(kk);
            }
        }
        if heap.len() == k {
            thr = heap.peek().map_or(f64::NEG_INFINITY, |r| key_value(r.0));
        }
    }
    heap.peek().map_or(0, |r| r.0)
}

/// Filters one row (already `t = z/T`, validated) into its kept set.
pub(super) fn filter_row(t: &[f64], p: &SampleOptions) -> Kept {
    let n = t.len();
    let mut t_max = f64::NEG_INFINITY;
    for &v in t {
        t_max = t_max.max(v);
    }
    let mut kept = Kept { cut: 0, cut_v: f64::NEG_INFINITY, cut_i: usize::MAX, min_p: None, ln_min_p: 0.0, t_max };
    // Top-k.
    if let Some(k) = p.top_k {
        let unmasked = t.iter().filter(|v| **v != f64::NEG_INFINITY).count();
        if k < unmasked {
            let kth = top_k_key(t, k);
            // Strict: exactly the first k. HF: every token tied in value with the k-th
            // survives; key(v, i) decreases with i, so the cut at value v with the last index
            // keeps all of them.
            let cut = if p.strict_top_k { kth } else { key(t[key_index(kth)], n - 1) };
            kept.set_cut(cut);
        }
    }
    // Top-p on the survivors, renormalised over them.
    if let Some(pp) = p.top_p {
        if pp < 1.0 {
            let m = t_max;
            let mut s = 0.0f64;
            let mut total = 0usize;
            for (i, &v) in t.iter().enumerate() {
                if kept.has(v, i) {
                    s += (v - m).exp();
                    total += 1;
                }
            }
            let lse = m + s.ln();
            // The first window comes from one heap pass; wider ones (rare: flat distributions)
            // from the collected survivors, selected in place.
            let mut keys: Vec<u128> = Vec::new();
            let mut c = 256.min(total);
            loop {
                let mut win = if keys.is_empty() && c == 256.min(total) {
                    top_keys(t.iter().enumerate().filter(|(i, v)| kept.has(**v, *i)).map(|(i, &v)| key(v, i)), c)
                } else {
                    if keys.is_empty() {
                        keys.extend(t.iter().enumerate().filter(|(i, v)| kept.has(**v, *i)).map(|(i, &v)| key(v, i)));
                    }
                    if c < total {
                        keys.select_nth_unstable_by(c - 1, |a, b| b.cmp(a));
                    }
                    keys[..c].to_vec()
                };
                win.sort_unstable_by(|a, b| b.cmp(a));
                let mut before = 0.0f64;
                let mut last = None;
                for &kk in win.iter() {
                    if before >= pp && last.is_some() {
                        break;
                    }
                    last = Some(kk);
                    before += (t[key_index(kk)] - lse).exp();
                }
                let done = before >= pp || c == total;
                if done {
                    if let Some(l) = last {
                        kept.set_cut(kept.cut.max(l));
                    }
                    break;
                }
                c = (c * 4).min(total);
            }
        }
    }
    // Min-p.
    if let Some(mp) = p.min_p {
        if mp > 0.0 {
            kept.min_p = Some(mp);
            kept.ln_min_p = mp.ln();
        }
    }
    kept
}
