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

/// Buckets of top-p's mass histogram, and their number per unit of `t` below the max: the
/// first window holds the nucleus plus at most one bucket's tokens for nuclei within 64 of
/// the max.
const HIST_BUCKETS: usize = 1024;
const HIST_PER_UNIT: f64 = 16.0;

/// One row as the filters see it: its tokens `(index, t)` in index order (`t = -inf` masked).
/// [`Dense`] lists every token; [`Candidates`] lists a subset outside which every unmasked
/// token has `t ≤ below()`, which [`Kept::separates`] turns into an exactness check.
pub(super) trait Tokens {
    /// The listed tokens, index ascending.
    fn each(&self) -> impl Iterator<Item = (usize, f64)> + '_;
    /// Row length.
    fn len(&self) -> usize;
    /// Unmasked tokens in the whole row.
    fn unmasked(&self) -> usize;
    /// Unmasked tokens listed.
    fn listed(&self) -> usize;
    /// A bound on `t` of every unmasked token not listed (`-inf`: every token is listed).
    fn below(&self) -> f64;
    /// Every token's `t` in index order, when the row lists them all.
    fn dense(&self) -> Option<&[f64]> {
        None
    }
}

/// Every token of a row: `t` and its unmasked count as [`prepare`] makes them.
pub(super) struct Dense<'a> {
    t: &'a [f64],
    unmasked: usize,
}

impl<'a> Dense<'a> {
    pub(super) fn new(t: &'a [f64], unmasked: usize) -> Self {
        Dense { t, unmasked }
    }
}

impl Tokens for Dense<'_> {
    fn each(&self) -> impl Iterator<Item = (usize, f64)> + '_ {
        self.t.iter().copied().enumerate()
    }
    fn len(&self) -> usize {
        self.t.len()
    }
    fn unmasked(&self) -> usize {
        self.unmasked
    }
    fn listed(&self) -> usize {
        self.unmasked
    }
    fn below(&self) -> f64 {
        f64::NEG_INFINITY
    }
    fn dense(&self) -> Option<&[f64]> {
        Some(self.t)
    }
}

/// The candidates of a row (unmasked, index ascending) found by the vector gate.
pub(super) struct Candidates {
    pub(super) list: Vec<(usize, f64)>,
    pub(super) len: usize,
    pub(super) unmasked: usize,
    pub(super) below: f64,
}

impl Tokens for Candidates {
    fn each(&self) -> impl Iterator<Item = (usize, f64)> + '_ {
        self.list.iter().copied()
    }
    fn len(&self) -> usize {
        self.len
    }
    fn unmasked(&self) -> usize {
        self.unmasked
    }
    fn listed(&self) -> usize {
        self.list.len()
    }
    fn below(&self) -> f64 {
        self.below
    }
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
    /// The value of the k-th token when top-k cut the listed tokens (`+inf` otherwise).
    top_k_v: f64,
    /// The smallest listed unmasked `t`.
    t_min: f64,
}

/// The value of a key (inverse of the order-preserving bit map in [`key`]).
#[inline]
pub(super) fn key_value(k: u128) -> f64 {
    let ord = (k >> 64) as u64;
    f64::from_bits(if ord >> 63 == 1 { ord & !(1 << 63) } else { !ord })
}

impl Kept {
    /// The kept set of a row whose top-p cut is `cut` (no top-k), then min-p (`t_max`: the
    /// row's largest `t`).
    pub(super) fn top_p(t_max: f64, cut: u128, min_p: Option<f64>) -> Kept {
        let mut kept = Kept::all(t_max, f64::INFINITY);
        kept.set_cut(cut);
        kept.set_min_p(min_p);
        kept
    }

    /// Every token kept (no cut, no min-p) of a row whose listed `t` span `[t_min, t_max]`.
    fn all(t_max: f64, t_min: f64) -> Kept {
        Kept {
            cut: 0,
            cut_v: f64::NEG_INFINITY,
            cut_i: usize::MAX,
            min_p: None,
            ln_min_p: 0.0,
            t_max,
            top_k_v: f64::INFINITY,
            t_min,
        }
    }

    fn set_min_p(&mut self, min_p: Option<f64>) {
        if let Some(mp) = min_p.filter(|&mp| mp > 0.0) {
            self.min_p = Some(mp);
            self.ln_min_p = mp.ln();
        }
    }

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

    /// Whether this kept set, computed from the listed tokens, is the row's: no unlisted token
    /// could be kept, and every sum the filters took (top-p's) covered every token it needs.
    /// Always true for a [`Dense`] row.
    pub(super) fn separates<R: Tokens>(&self, row: &R, p: &SampleOptions) -> bool {
        let below = row.below();
        if below == f64::NEG_INFINITY {
            return true;
        }
        if self.t_max <= below || self.t_max.is_nan() {
            return false;
        }
        let top_k = p.top_k.filter(|&k| k < row.unmasked());
        // Top-k over the listed tokens found the row's k-th value (a value every unlisted
        // token is below), or, with fewer listed than k, every listed token outranks every
        // unlisted one and so lies in the top k.
        let (top_k_ok, cut_by_top_k) = match top_k {
            None => (true, false),
            Some(k) if k <= row.listed() => (self.top_k_v > below, true),
            Some(_) => (self.t_min > below, false),
        };
        if !top_k_ok {
            return false;
        }
        if p.top_p.is_some_and(|pp| pp < 1.0) && !cut_by_top_k {
            return false;
        }
        // Unlisted tokens are cut by top-k, or fail min-p (`t − t_max = t − 0 ≤ below`).
        cut_by_top_k || (self.min_p.is_some() && below < self.ln_min_p - 1e-9)
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

/// The key of the k-th token in the order (`k ≤` the unmasked count): a size-k min-heap over
/// one pass that rejects most values by one f64 comparison with the heap's smallest value.
pub(super) fn top_k_key<R: Tokens>(row: &R, k: usize) -> u128 {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    if k > 4096 {
        let mut all: Vec<u128> = row.each().filter(|(_, v)| *v != f64::NEG_INFINITY).map(|(i, v)| key(v, i)).collect();
        all.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        return all[k - 1];
    }
    let mut heap: BinaryHeap<Reverse<u128>> = BinaryHeap::with_capacity(k + 1);
    let mut thr = f64::NEG_INFINITY;
    for (i, v) in row.each() {
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

thread_local! {
    /// Top-p's per-thread buffer of the exponentials of a row.
    static EXP_SCRATCH: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Top-p's histogram bucket of `v`: its distance below the max `m` in `1/HIST_PER_UNIT` steps,
/// the last bucket open.
#[inline]
fn bucket(m: f64, v: f64) -> usize {
    ((m - v) * HIST_PER_UNIT).min((HIST_BUCKETS - 1) as f64) as usize
}

/// Top-p's last kept key (`None`: no survivor), from the survivors' mass `s` (their `Σ exp(t −
/// m)`, `total` of them) and its histogram by [`bucket`]. The window is every survivor down
/// to the bucket where the mass reaches `p` (a prefix of the order, since the buckets follow
/// the values), sorted; the walk over it is the definition's. The 1e-9 margin on `p` covers
/// the histogram's summation order; should rounding still leave the walk short, the window
/// becomes every survivor.
///
/// With `eta > 0`, `s` is within a relative `eta` of the exact sum: the walk's running sum is
/// then within `eta` of the exact one, and the result is `Some` only when each comparison with
/// `p` that decided the cut holds by more than that margin (so the exact walk cuts at the same
/// token); `None` asks for the exact sum.
#[allow(clippy::too_many_arguments)]
fn nucleus<R: Tokens>(
    row: &R,
    kept: &Kept,
    pp: f64,
    m: f64,
    s: f64,
    total: usize,
    hist: &[f64; HIST_BUCKETS],
    eta: f64,
) -> Option<Option<u128>> {
    let lse = m + s.ln();
    let need = pp * s * (1.0 + 1e-9);
    let (mut acc, mut last_b) = (0.0f64, HIST_BUCKETS - 1);
    for (b, &h) in hist.iter().enumerate() {
        acc += h;
        if acc >= need {
            last_b = b;
            break;
        }
    }
    // Buckets `0..=upto` hold the values with `(m − v)·HIST_PER_UNIT < upto + 1`; the floor
    // below is a little under that, so its survivors are a prefix of the order that holds them.
    let survivors = |upto: usize| -> Vec<u128> {
        let floor = if upto + 1 >= HIST_BUCKETS {
            f64::NEG_INFINITY
        } else {
            m - ((upto + 1) as f64 / HIST_PER_UNIT) * (1.0 + 1e-12)
        };
        row.each().filter(|&(i, v)| v >= floor && kept.has(v, i)).map(|(i, v)| key(v, i)).collect()
    };
    let mut win = survivors(last_b);
    loop {
        win.sort_unstable_by(|a, b| b.cmp(a));
        // `prev`: the running sum at the last comparison that kept going.
        let (mut before, mut prev) = (0.0f64, f64::NEG_INFINITY);
        let mut last = None;
        for &kk in win.iter() {
            if before >= pp && last.is_some() {
                break;
            }
            if last.is_some() {
                prev = before;
            }
            last = Some(kk);
            before += (key_value(kk) - lse).exp();
        }
        if before >= pp || win.len() == total {
            let stopped = before >= pp;
            let sure = eta == 0.0
                || (prev * (1.0 + eta) < pp
                    && (if stopped { before * (1.0 - eta) >= pp } else { before * (1.0 + eta) < pp }));
            return sure.then_some(last);
        }
        win = survivors(HIST_BUCKETS - 1);
    }
}

/// Filters one row (already `t = (z − max z)/T`, validated) into its kept set, over the listed
/// tokens (see [`Kept::separates`] for when that is the row's kept set).
pub(super) fn filter_row<R: Tokens>(row: &R, p: &SampleOptions) -> Kept {
    let n = row.len();
    let (mut t_max, mut t_min) = (f64::NEG_INFINITY, f64::INFINITY);
    for (_, v) in row.each() {
        t_max = if v > t_max { v } else { t_max };
        let w = if v == f64::NEG_INFINITY { f64::INFINITY } else { v };
        t_min = if w < t_min { w } else { t_min };
    }
    let mut kept = Kept::all(t_max, t_min);
    // Top-k.
    if let Some(k) = p.top_k {
        if k < row.unmasked() && k <= row.listed() {
            let kth = top_k_key(row, k);
            // Strict: exactly the first k. HF: every token tied in value with the k-th
            // survives; key(v, i) decreases with i, so the cut at value v with the last index
            // keeps all of them.
            let v = key_value(kth);
            kept.top_k_v = v;
            let cut = if p.strict_top_k { kth } else { key(v, n - 1) };
            kept.set_cut(cut);
        }
    }
    // Top-p on the survivors, renormalised over them.
    if let Some(pp) = p.top_p {
        if pp < 1.0 {
            // Every token of a row without a top-k cut: the mass from the vector exponential,
            // whose cut is proved to be the exact one or redone (see `nucleus`).
            let fast = row.dense().filter(|_| kept.cut == 0).and_then(|t| {
                let level = crate::arch::SimdLevel::resolve(p.exec.simd);
                let (s, hist) = EXP_SCRATCH.with(|cell| {
                    let mut e = cell.take();
                    e.clear();
                    e.resize(t.len(), 0.0);
                    let s = crate::arch::select::exp_sum_f64(level, t, t_max, &mut e);
                    // Four histograms in turn: consecutive tokens in one bucket do not wait on
                    // each other's store. (Their order only sizes the window.)
                    let mut hist4 = [[0.0f64; HIST_BUCKETS]; 4];
                    for (j, (&v, &ei)) in t.iter().zip(&e).enumerate() {
                        hist4[j & 3][bucket(t_max, v.max(f64::MIN))] += ei;
                    }
                    cell.set(e);
                    let hist: [f64; HIST_BUCKETS] =
                        core::array::from_fn(|b| (hist4[0][b] + hist4[1][b]) + (hist4[2][b] + hist4[3][b]));
                    (s, hist)
                });
                // |s − s_libm| ≤ (1e-13 + 2·n·2^−53)·s (exp_sum_f64), so every probability
                // of the walk is within that of the exact one, and each running sum within
                // that plus its own rounding.
                let eta = 1e-12 + 4.0 * n as f64 * f64::EPSILON;
                nucleus(row, &kept, pp, t_max, s, row.unmasked(), &hist, eta)
            });
            let last = match fast {
                Some(last) => last,
                None => {
                    let m = t_max;
                    let mut s = 0.0f64;
                    let mut total = 0usize;
                    let mut hist = [0.0f64; HIST_BUCKETS];
                    for (i, v) in row.each() {
                        if kept.has(v, i) {
                            let e = (v - m).exp();
                            s += e;
                            total += 1;
                            hist[bucket(m, v)] += e;
                        }
                    }
                    nucleus(row, &kept, pp, m, s, total, &hist, 0.0).flatten()
                }
            };
            if let Some(l) = last {
                kept.set_cut(kept.cut.max(l));
            }
        }
    }
    kept.set_min_p(p.min_p);
    kept
}
