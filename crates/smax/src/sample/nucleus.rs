//! Top-p without top-k on f32 rows, in a few vector passes instead of a pass in f64 per token.
//!
//! 1. [`scan`]: the max and the row's validity.
//! 2. [`tail_mass`]: `e = exp(t)` in f32 for every token, summed below each of a few depths
//!    under the max (`t < −4, −6, −7.5, −10, −16`).
//! 3. The *head* is every token above the shallowest depth whose head holds more than `p` of
//!    the mass and whose tail sum has a small enough error bound; [`collect_at_least`] lists it.
//! 4. The head's `t` in f64, exactly as the definition forms them, and their exponentials by
//!    [`exp_sum_f64`] (within 1e-14 of libm); `S = Σ head + tail` with a proved error bound.
//! 5. A histogram of the head's mass over 1024 slices of `t` finds the slices where the running
//!    mass may cross `p·S`; only their tokens are sorted, and the walk over them is the
//!    definition's, with every comparison with `p` that decides the cut checked against the
//!    bound. A failed check recomputes `S` in f64 over the whole row ([`exp_sum_row`]) and tries
//!    again; a second failure leaves the row to the f64 path.
//!
//! The result is the definition's kept set, bit for bit; only the time depends on the checks.

use super::filter::{Candidates, Kept, key, key_index, key_value};
use super::{SampleOptions, finish, scaled, shift};
use crate::arch::SimdLevel;
use crate::arch::select::{TAILS, TailMass, collect_at_least, exp_sum_f64, exp_sum_row, scan, tail_mass};

/// Depths below the max, in units of `t`, of [`tail_mass`]'s thresholds.
const DEPTH: [f64; TAILS] = [4.0, 6.0, 7.5, 10.0, 16.0];
/// A bound on `|t|` of every token whose f32 exponential is not flushed to zero (the flush is
/// at `t < −87.34`).
const DEEPEST: f64 = 88.0;
/// Slices of the head's histogram.
const SLICES: usize = 1024;
/// Rows shorter than this take the f64 path (its passes are cheap there).
const MIN_LEN: usize = 4096;
/// The largest tail error, relative to the row's mass, for which a head is taken without
/// looking deeper (a smaller one makes the checks fail less often, a deeper head costs more).
const TAIL_ERR: f64 = 1e-6;

/// The per-thread buffers of [`top_p`].
#[derive(Default)]
struct Scratch {
    idx: Vec<u32>,
    t: Vec<f64>,
    e: Vec<f64>,
    zh: Vec<f32>,
    slice: Vec<u16>,
    win: Vec<(u128, f64)>,
    pick: Vec<u32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// One f32 row under top-p without top-k (min-p after it is allowed): the token and kept count
/// as `sample_row` returns them, or `None` when this path does not take the row (short rows,
/// NaN or `+inf`, no unmasked token, extreme temperatures, a nucleus deeper than 16 below the
/// max, or both checks failing); the f64 path then does.
pub(super) fn top_p(z: &[f32], p: &SampleOptions, u: Option<f64>, lp: Option<&mut [f64]>) -> Option<(usize, usize)> {
    let pp = p.top_p.filter(|&pp| pp < 1.0)?;
    let temp = p.temperature;
    let n = z.len();
    if p.top_k.is_some() || n < MIN_LEN || u32::try_from(n).is_err() || !(1e-30..=1e30).contains(&temp) {
        return None;
    }
    let level = SimdLevel::resolve(p.exec.simd);
    let facts = scan(level, z);
    if facts.invalid || facts.masked >= n {
        return None;
    }
    let unmasked = n - facts.masked;
    let m32 = facts.max;
    let m = shift(f64::from(m32));
    let k = (1.0 / temp) as f32;
    if !k.is_normal() {
        return None;
    }
    let thr: [f32; TAILS] = core::array::from_fn(|j| ((m - DEPTH[j] * temp) as f32).max(f32::MIN));
    let tm = tail_mass(level, z, m32, k, thr);
    let head = pick_head(&tm, &thr, m, temp, pp, n)?;
    SCRATCH.with(|cell| {
        let mut sc = cell.take();
        let res = run(level, z, p, pp, m, thr[head.0], (tm.below[head.0], head.1), unmasked, &mut sc, u, lp);
        cell.set(sc);
        res
    })
}

/// The head's depth index and the error bound of its tail sum, or `None` when no depth's head
/// holds clearly more than `p` of the f32 mass (the walk then checks the head's f64 mass).
fn pick_head(tm: &TailMass, thr: &[f32; TAILS], m: f64, temp: f64, pp: f64, n: usize) -> Option<(usize, f64)> {
    // The |t| bound of the tokens at or above each threshold, and of every unflushed token.
    let reach =
        |j: usize| if j < TAILS { ((m - f64::from(thr[j])) / temp * (1.0 + 1e-12)).min(DEEPEST) } else { DEEPEST };
    let b = |j: usize| if j < TAILS { tm.below[j] } else { 0.0 };
    // Per token, `e` in f32 is within 2 ULP (2^-22) of exp(t32), and t32 within 3 roundings
    // (3·2^-24·|t|) of the exact t: the relative error is 2^-22 + 3.03·2^-24·|t|. The tail's
    // Σ e·|t| is bounded slice by slice (each slice's tokens reach at most the next depth).
    let err = |j: usize| {
        let mut a = 0.0;
        for jj in j..TAILS {
            a += reach(jj + 1) * (b(jj) - b(jj + 1)).max(0.0);
        }
        a += DEEPEST * (TAILS as f64) * 4e-5 * b(j);
        let rel = (tm.sum_rel + 2f64.powi(-22) * 1.0001 + 1e-13) * 1.0001;
        rel * b(j) * (1.0 + 4e-5) + 3.04 * 2f64.powi(-24) * a + n as f64 * 2f64.powi(-125)
    };
    let holds = |j: usize| tm.total - b(j) >= pp * tm.total * (1.0 + 1e-4);
    let first = (0..TAILS).find(|&j| holds(j))?;
    let j = (first..TAILS).find(|&j| err(j) <= TAIL_ERR * tm.total).unwrap_or(TAILS - 1);
    Some((j, err(j)))
}

/// Steps 3 to 5 of the module docs over the head `z ≥ floor`, whose tail sum is `tail` within
/// `tail_err`.
#[allow(clippy::too_many_arguments)]
fn run(
    level: SimdLevel,
    z: &[f32],
    p: &SampleOptions,
    pp: f64,
    m: f64,
    floor: f32,
    (tail, tail_err): (f64, f64),
    unmasked: usize,
    sc: &mut Scratch,
    u: Option<f64>,
    lp: Option<&mut [f64]>,
) -> Option<(usize, usize)> {
    let n = z.len();
    let temp = p.temperature;
    sc.idx.clear();
    collect_at_least(level, z, floor, &mut sc.idx);
    let nh = sc.idx.len();
    // The head's logits side by side, so that the loops below vectorize.
    sc.zh.clear();
    sc.zh.extend(sc.idx.iter().map(|&i| z[i as usize]));
    sc.t.clear();
    sc.t.resize(nh, 0.0);
    if temp == 1.0 {
        // `(z − m)/1` is `z − m` exactly.
        for (t, &v) in sc.t.iter_mut().zip(&sc.zh) {
            *t = f64::from(v) - m;
        }
    } else {
        for (t, &v) in sc.t.iter_mut().zip(&sc.zh) {
            *t = scaled(f64::from(v), m, temp);
        }
    }
    // Every token below the head has a t below every head token's (distinct f32 logits can
    // share a t only at extreme temperatures).
    let t_floor = scaled(f64::from(floor), m, temp);
    if scaled(f64::from(floor.next_down()), m, temp) >= t_floor {
        return None;
    }
    sc.e.clear();
    sc.e.resize(nh, 0.0);
    let h = exp_sum_f64(level, &sc.t, 0.0, &mut sc.e);
    let head_err = (1e-13 + 2.0 * nh as f64 * f64::EPSILON) * h;
    // Slices of t from the max down to the floor: a token in an earlier slice has a larger t,
    // so the tokens of a run of slices are a run of the order.
    let scale = if t_floor < 0.0 { SLICES as f64 / -t_floor } else { 0.0 };
    sc.slice.clear();
    sc.slice.extend(sc.t.iter().map(|&t| (-t * scale).min((SLICES - 1) as f64) as u16));
    // Two histograms in turn: neighbours in one slice do not wait on each other's store.
    let mut mass2 = [[0.0f64; SLICES]; 2];
    for (j, (&sl, &e)) in sc.slice.iter().zip(&sc.e).enumerate() {
        mass2[j & 1][sl as usize] += e;
    }
    let mass: [f64; SLICES] = core::array::from_fn(|b| mass2[0][b] + mass2[1][b]);
    // The cut under the sum `s` known within `s_err`, both tries.
    let try_cut = |s: f64, s_err: f64, win: &mut Vec<(u128, f64)>| -> Option<u128> {
        let target = pp * s;
        // The running sums divided by `s` are within `slack/s` of the definition's: the head's
        // error and the sum's, twice over for the division, plus the definition's own roundings.
        let slack = 2.01 * (s_err + head_err) + (1e-12 + 8.0 * n as f64 * f64::EPSILON) * s;
        let (mut acc, mut first, mut last, mut above) = (0.0f64, None, None, 0.0f64);
        for (b, &mb) in mass.iter().enumerate() {
            let next = acc + mb;
            if first.is_none() && next >= target - slack {
                first = Some(b);
                above = acc;
            }
            if next >= target + slack {
                last = Some(b);
                break;
            }
            acc = next;
        }
        let (first, last) = (first?, last?);
        win.clear();
        for (j, &sl) in sc.slice.iter().enumerate() {
            if (first..=last).contains(&(sl as usize)) {
                win.push((key(sc.t[j], sc.idx[j] as usize), sc.e[j]));
            }
        }
        win.sort_unstable_by_key(|w| std::cmp::Reverse(w.0));
        // Every head token has e > 0 (t ≥ −16 or so): a positive mass above means a token.
        let (mut run, mut prev) = (above, if above > 0.0 { Some(above) } else { None });
        for &(kk, e) in win.iter() {
            let next = run + e;
            if next >= target {
                let sure = next >= target + slack && prev.is_none_or(|v| v < target - slack);
                return sure.then_some(kk);
            }
            run = next;
            prev = Some(run);
        }
        None
    };
    let mut win = std::mem::take(&mut sc.win);
    let s1 = h + tail;
    let mut cut = try_cut(s1, tail_err, &mut win);
    if cut.is_none() {
        let s2 = exp_sum_row(level, z, m, temp);
        cut = try_cut(s2, (1e-13 + 2.0 * n as f64 * f64::EPSILON) * s2, &mut win);
    }
    sc.win = win;
    let cut = cut?;
    let kept = Kept::top_p(0.0, cut, p.min_p);
    let (cv, ci) = (key_value(cut), key_index(cut));
    // The kept head tokens (positions in the head), written unconditionally and kept by a
    // count: about a third of a random order passes, a branch would mispredict.
    sc.pick.clear();
    sc.pick.resize(nh, 0);
    let mut w = 0;
    for (j, (&i, &t)) in sc.idx.iter().zip(&sc.t).enumerate() {
        sc.pick[w] = j as u32;
        w += ((t > cv) | ((t == cv) & (i as usize <= ci))) as usize;
    }
    sc.pick.truncate(w);
    if p.min_p.is_some() {
        let (idx, t) = (&sc.idx, &sc.t);
        sc.pick.retain(|&j| kept.has(t[j as usize], idx[j as usize] as usize));
    }
    if lp.is_none() {
        if let Some(r) = draw(&sc.pick, &sc.e, &sc.idx, u) {
            return Some(r);
        }
    }
    let list: Vec<(usize, f64)> = sc.pick.iter().map(|&j| (sc.idx[j as usize] as usize, sc.t[j as usize])).collect();
    let below = cv;
    Some(finish(&Candidates { list, len: n, unmasked, below }, &kept, u, lp))
}

/// [`finish`]'s draw, without the log-probabilities, over the kept tokens (`pick`: their
/// positions in the head, index order; `e` within 1e-14 of libm's `exp(t)`; `idx` the head's
/// indices): the token at which the running sum passes `u·Σ`, when the sums' error bound
/// proves it is the one the libm sums give; `None` otherwise. Without `u`, no token and the
/// kept count.
fn draw(pick: &[u32], e: &[f64], idx: &[u32], u: Option<f64>) -> Option<(usize, usize)> {
    let count = pick.len();
    let Some(u) = u else { return Some((usize::MAX, count)) };
    let s: f64 = pick.iter().map(|&j| e[j as usize]).sum();
    // Running sums and the total are within `eta` of the libm ones (1e-14 per term, plus
    // the roundings of sums of at most `count` terms, twice over).
    let eta = (1e-13 + 4.0 * count as f64 * f64::EPSILON) * s;
    let target = u * s;
    let (hi, lo) = (target * (1.0 + f64::EPSILON) + 2.0 * eta, target * (1.0 - f64::EPSILON) - 2.0 * eta);
    let mut acc = 0.0f64;
    for &j in pick {
        let prev = acc;
        acc += e[j as usize];
        if acc > target {
            return (acc - eta > hi && prev + eta < lo).then_some((idx[j as usize] as usize, count));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::filter::{Dense, filter_row};
    use super::super::prepare;
    use super::*;

    /// The f64 path's answer: token, kept count and log-probabilities.
    fn dense(z: &[f32], p: &SampleOptions, u: f64) -> (usize, usize, Vec<f64>) {
        let (t, unmasked) = prepare(z, p.temperature, 0).unwrap();
        let d = Dense::new(&t, unmasked);
        let mut lp = vec![0.0; z.len()];
        let (tok, count) = finish(&d, &filter_row(&d, p), Some(u), Some(&mut lp));
        (tok, count, lp)
    }

    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Compares this path with the f64 path on one row; returns whether this path took it.
    fn check(z: &[f32], p: &SampleOptions, u: f64, what: &str) -> bool {
        let (tok, count, lp) = dense(z, p, u);
        let Some(fast) = top_p(z, p, Some(u), None) else { return false };
        assert_eq!(fast, (tok, count), "{what}: the draw");
        let mut lp2 = vec![f64::NAN; z.len()];
        let with_lp = top_p(z, p, Some(u), Some(&mut lp2));
        assert_eq!(with_lp, Some((tok, count)), "{what}: the draw with log-probabilities");
        for (j, (a, b)) in lp2.iter().zip(&lp).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{what}: log-probability {j}");
        }
        true
    }

    #[test]
    fn matches_the_f64_path_bit_for_bit() {
        let mut rng = Rng(0x5eed);
        let mut taken = [[0usize; 6]; 3];
        for (ni, &n) in [131_072usize, 20_000, 4_099].iter().enumerate() {
            for shape in 0..6 {
                let z: Vec<f32> = (0..n)
                    .map(|i| {
                        let bell = (0..4).map(|_| rng.uniform()).sum::<f64>() - 2.0;
                        let v = match shape {
                            0 => bell * 6.9,
                            1 => bell * 14.0,
                            2 => bell * 2.0,
                            // Quantised: many exact ties, at the cut too.
                            3 => (bell * 24.0).round() / 4.0,
                            // Masked tokens and a large offset.
                            4 if i % 7 == 3 => f64::NEG_INFINITY,
                            4 => 1000.0 + bell * 6.9,
                            // Gaussian-like, moderate spread.
                            _ => bell * 4.0,
                        };
                        v as f32
                    })
                    .collect();
                for &pp in &[0.5, 0.9, 0.95, 0.99] {
                    for &(temperature, min_p) in &[(1.0, None), (0.7, None), (1.5, Some(0.01))] {
                        let p = SampleOptions { top_p: Some(pp), temperature, min_p, ..Default::default() };
                        let u = rng.uniform();
                        let what = format!("n={n} shape={shape} p={pp} T={temperature} min_p={min_p:?}");
                        taken[ni][shape] += check(&z, &p, u, &what) as usize;
                    }
                }
            }
        }
        // Every row here goes this way (none has a nucleus deeper than 16 below the max).
        let all: usize = taken.iter().flatten().sum();
        assert!(all * 10 >= 216 * 9, "taken {taken:?} of 12 each");
    }

    #[test]
    fn a_cut_within_the_f32_bound_is_settled_by_the_f64_sum() {
        // One token at 0, 2000 at −2.1, 20000 at −7, T = 0.7 (t = 0, −3, −10). Every tail term
        // carries the same f32 errors (the f32 `1/T` is 2.4e-8 off, and the `exp` at −10), so
        // the f32 sum moves the running mass by ~1e-9; p sits 3e-10 on either side of the mass
        // after the top token and the first 1000 of the −3 group, inside the f32 bound but
        // outside the f64 one. With the margin check removed, this test fails.
        let mut z = vec![-2.1f32; 2001];
        z[100] = 0.0;
        z.extend(std::iter::repeat_n(-7.0f32, 20_000));
        let t: Vec<f64> = z.iter().map(|&v| f64::from(v) / 0.7).collect();
        let s: f64 = t.iter().map(|v| v.exp()).sum();
        let lse = s.ln();
        let before = t[100] - lse;
        let mass = before.exp() + t.iter().take(1001).filter(|&&v| v != 0.0).map(|v| (v - lse).exp()).sum::<f64>();
        for (pp, what) in [(mass - 3e-10, "just below"), (mass + 3e-10, "just above")] {
            let p = SampleOptions { top_p: Some(pp), temperature: 0.7, ..Default::default() };
            for u in [0.0, 0.37, 0.999] {
                assert!(check(&z, &p, u, what), "{what}: the f64 sum settles it");
            }
        }
    }
}
