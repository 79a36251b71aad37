//! The vector candidate search for f32 rows: one pass for the row's max and validity, one gated
//! pass that looks inside a block of 64 logits only when its maximum reaches a moving
//! threshold (top-k: the k-th largest value seen so far; min-p without top-p: the logit below
//! which every token fails min-p). Only the candidates are turned into `t = (z − max z)/T` and
//! go through the f64 filters; [`Kept::separates`] then proves that no other token could have
//! been kept, or the row is redone from every token. Either way the result is the definition's,
//! bit for bit.

use super::filter::Candidates;
use super::{SampleOptions, scaled, shift};
use crate::arch::select::{GATE_BLOCK, gate, scan};
use crate::arch::{SimdLevel, inl_mut};

/// Largest top-k the gate serves (larger: every token).
const MAX_K: usize = 4096;

/// The candidates of row `z` under `p`, or `None` when the gate cannot serve the row: NaN or
/// `+inf` in it, no unmasked token (the f64 path reports both), top-p without top-k, neither
/// top-k nor min-p, a top-k above [`MAX_K`], too many candidates, or a `t` that underflows to
/// `-inf` (a temperature so small that finite logits become masked ones).
pub(super) fn candidates(z: &[f32], p: &SampleOptions) -> Option<Candidates> {
    let top_p = p.top_p.is_some_and(|pp| pp < 1.0);
    if p.temperature != 0.0 && p.top_k.is_none() && (top_p || !p.min_p.is_some_and(|mp| mp > 0.0)) {
        // Nothing below can gate the row (no top-k; min-p absent or behind top-p): skip the
        // scan, the f64 path takes the row.
        return None;
    }
    let level = SimdLevel::resolve(p.exec.simd);
    let n = z.len();
    let facts = scan(level, z);
    if facts.invalid || facts.masked >= n {
        return None;
    }
    let unmasked = n - facts.masked;
    let m = shift(facts.max as f64);
    let temp = p.temperature;
    if temp == 0.0 {
        // Greedy: the first index holding the max is the whole answer.
        let i = z.iter().position(|&v| v == facts.max)?;
        return Some(Candidates { list: vec![(i, m)], len: n, unmasked, below: m });
    }
    let top_k = p.top_k.filter(|&k| k < unmasked && k <= MAX_K);
    // Min-p alone needs no sum over the tokens it drops, so its boundary can gate the search:
    // an f32 at or below `m + T·(ln p_base − 1e-9)`, where `t` is below min-p's margin.
    let floor = match p.min_p.filter(|&mp| mp > 0.0) {
        Some(mp) if !top_p => {
            let g = m + temp * (mp.ln() - 1e-9);
            let f = g as f32;
            if f as f64 > g { f.next_down() } else { f }
        }
        _ => f32::NEG_INFINITY,
    };
    if top_k.is_none() && floor == f32::NEG_INFINITY {
        return None;
    }
    // Min-p alone stops when the floor lets through a large part of the row (flat logits):
    // the f64 path is no slower there.
    let most = n / 8 + GATE_BLOCK;
    let mut cap = top_k.map_or(usize::MAX, |k| 2 * k + GATE_BLOCK);
    let mut buf: Vec<(usize, f32)> = Vec::with_capacity(top_k.map_or(4 * GATE_BLOCK, |k| 2 * k + 2 * GATE_BLOCK));
    let visit = inl_mut(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |start: usize, blk: &[f32], thr: f32| -> Option<f32> {
            for (j, &v) in blk.iter().enumerate() {
                if v >= thr && v != f32::NEG_INFINITY {
                    buf.push((start + j, v));
                }
            }
            match top_k {
                Some(k) if buf.len() >= cap => {
                    // The buffer's k-th largest value is at most the row's: a safe new threshold.
                    buf.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
                    let kth = buf[k - 1].1;
                    buf.retain(|e| e.1 >= kth);
                    if 2 * buf.len() > cap {
                        // Many ties at the k-th value: room for them.
                        cap = cap.saturating_mul(2);
                        if cap > n / 2 {
                            return None;
                        }
                    }
                    Some(kth.max(thr))
                }
                None if buf.len() > most => None,
                _ => Some(thr),
            }
        },
    );
    let thr = gate(level, z, floor, visit)?;
    buf.sort_unstable_by_key(|e| e.0);
    let list: Vec<(usize, f64)> = buf.iter().map(|&(i, v)| (i, scaled(v as f64, m, temp))).collect();
    if list.iter().any(|e| e.1 == f64::NEG_INFINITY) {
        return None;
    }
    // Every unlisted unmasked token is below `thr`, so at most the f32 just under it.
    let below = if list.len() == unmasked { f64::NEG_INFINITY } else { scaled(thr.next_down() as f64, m, temp) };
    if below == f64::NEG_INFINITY && list.len() < unmasked {
        return None;
    }
    Some(Candidates { list, len: n, unmasked, below })
}
