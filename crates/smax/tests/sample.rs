//! Sampling: the worked example D1, bit-for-bit agreement with a full-sort implementation of
//! the documented definition (ties and cumsum corners included), chi-square tests of the draws,
//! Gumbel-max, edge cases and determinism.

#![allow(clippy::collapsible_if)]
mod common;

use common::Rng;
use smax::SimdLevel;
use smax::sample::{
    Draw, GumbelSource, Processed, SampleOptions, counter_u64, counter_uniform, gumbel_max, process, sample,
};
use smax::{Error, Par, View, ViewMut};

/// The definition, with a full sort: returns the log-probabilities (−inf where removed).
fn reference(z: &[f64], p: &SampleOptions) -> Vec<f64> {
    let n = z.len();
    // t = (z − max z)/T: the shift first, so that a small T never makes the largest +inf.
    let zmax = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max) + 0.0;
    let t: Vec<f64> = z.iter().map(|&v| (v - zmax) / p.temperature).collect();
    // Order: t descending, index ascending (−0 and +0 tie).
    let mut order: Vec<usize> = (0..n).filter(|&i| t[i] != f64::NEG_INFINITY).collect();
    order.sort_by(|&a, &b| (t[b] + 0.0).partial_cmp(&(t[a] + 0.0)).unwrap().then(a.cmp(&b)));
    let mut keep = vec![false; n];
    for &i in &order {
        keep[i] = true;
    }
    if let Some(k) = p.top_k {
        if k < order.len() {
            let kth = t[order[k - 1]];
            for (j, &i) in order.iter().enumerate() {
                keep[i] = if p.strict_top_k { j < k } else { t[i] >= kth };
            }
        }
    }
    if let Some(pp) = p.top_p {
        if pp < 1.0 {
            let m = t.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut s = 0.0;
            for i in 0..n {
                if keep[i] {
                    s += (t[i] - m).exp();
                }
            }
            let lse = m + s.ln();
            let mut before = 0.0;
            let mut first = true;
            for &i in &order {
                if !keep[i] {
                    continue;
                }
                if before >= pp && !first {
                    keep[i] = false;
                    continue;
                }
                first = false;
                before += (t[i] - lse).exp();
            }
        }
    }
    if let Some(mp) = p.min_p {
        let m = t.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        for i in 0..n {
            if keep[i] && mp > 0.0 && (t[i] - m).exp() < mp {
                keep[i] = false;
            }
        }
    }
    let m = t.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for i in 0..n {
        if keep[i] {
            s += (t[i] - m).exp();
        }
    }
    let lse = m + s.ln();
    (0..n).map(|i| if keep[i] { t[i] - lse } else { f64::NEG_INFINITY }).collect()
}

/// Asserts `got` and `want` equal bit for bit, naming the first differing index.
fn assert_same_bits(got: &[f64], want: &[f64], what: impl std::fmt::Display) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: [{i}] {g} vs {w}");
    }
}

fn processed(z: &[f64], rows: usize, p: &SampleOptions, what: Processed) -> Vec<f64> {
    let n = z.len() / rows;
    let mut out = vec![0.0f64; z.len()];
    process(View::rows(z, rows, n).unwrap(), ViewMut::rows(&mut out, rows, n).unwrap(), what, p).unwrap();
    out
}

#[test]
fn worked_example_d1() {
    let z = [2.0, 1.0, 0.5, -1.0, -3.0];
    let close = |got: &[f64], want: &[f64]| {
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() <= 1e-9 * (1.0 + b.abs()), "{got:?} vs {want:?}");
        }
    };
    let p = |f: &dyn Fn(&mut SampleOptions)| {
        let mut s = SampleOptions::default();
        f(&mut s);
        processed(&z, 1, &s, Processed::Probs)
    };
    close(
        &p(&|s| s.temperature = 0.7),
        &[0.72911567739, 0.17473332777, 0.085539243258, 0.010035392687, 5.7635888741e-04],
    );
    close(&p(&|s| s.top_k = Some(2)), &[0.7310585786, 0.2689414214, 0.0, 0.0, 0.0]);
    close(&p(&|s| s.top_p = Some(0.9)), &[0.6285317192, 0.2312238976, 0.1402443832, 0.0, 0.0]);
    close(&p(&|s| s.top_p = Some(0.8)), &[0.7310585786, 0.2689414214, 0.0, 0.0, 0.0]);
    close(&p(&|s| s.min_p = Some(0.1)), &[0.6285317192, 0.2312238976, 0.1402443832, 0.0, 0.0]);
}

#[test]
fn equals_the_full_sort_reference_bit_for_bit() {
    let mut rng = Rng(0x5a);
    for &n in &[1usize, 2, 7, 100, 1000, 5000] {
        for case in 0..40 {
            // Quantised logits make many ties; some masked entries.
            let z: Vec<f64> = (0..n)
                .map(|i| if i % 11 == 5 && n > 1 { f64::NEG_INFINITY } else { (rng.uniform() * 8.0).round() / 2.0 })
                .collect();
            if z.iter().all(|v| *v == f64::NEG_INFINITY) {
                continue;
            }
            let pick = |r: &mut Rng, a: f64, b: f64| a + (b - a) * (r.uniform() + 1.0) / 2.0;
            let p = SampleOptions {
                temperature: [1.0, 0.7, 1.3][case % 3],
                top_k: if case % 4 == 0 { None } else { Some(1 + (rng.next_u64() % (n as u64 + 2)) as usize) },
                strict_top_k: case % 5 == 1,
                top_p: if case % 3 == 0 { None } else { Some(pick(&mut rng, 0.05, 1.0)) },
                min_p: if case % 7 < 3 { Some(pick(&mut rng, 0.0, 0.5)) } else { None },
                exec: smax::Exec::default(),
            };
            let want = reference(&z, &p);
            let got = processed(&z, 1, &p, Processed::LogProbs);
            assert_same_bits(&got, &want, format!("n={n} case {case} {p:?}"));
        }
    }
}

#[test]
fn top_p_boundaries_and_cumsum_corners() {
    // Probabilities whose cumulative mass lands on p (up to rounding) and a p just below 1.
    let probs = [0.5f64, 0.4, 0.1];
    let z: Vec<f64> = probs.iter().map(|p| p.ln()).collect();
    for pp in [0.5, 0.9, 0.9 + 1e-12, 0.9 - 1e-12, 0.9999999, 1.0, 1e-9] {
        let p = SampleOptions { top_p: Some(pp), ..Default::default() };
        let got = processed(&z, 1, &p, Processed::LogProbs);
        let want = reference(&z, &p);
        assert_eq!(got, want, "p = {pp}");
        assert!(got[0].is_finite(), "the first token is always kept");
    }
    // Top-k then top-p renormalises over the top-k survivors (candle compares the raw mass).
    // Over the top-2 survivors the masses are 0.5, 0.5, so p = 0.4 keeps one token; against
    // the unrenormalised mass (0.27 for the first) it would keep two.
    let z = [1.0f64, 1.0, 0.0, 0.0, 0.0, 0.0];
    let p = SampleOptions { top_k: Some(2), top_p: Some(0.4), ..Default::default() };
    let got = processed(&z, 1, &p, Processed::Probs);
    assert_eq!(got, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    // Ties at the top-k boundary: kept (HF), or exactly k by index (strict).
    let z = [3.0f64, 2.0, 2.0, 2.0, 1.0];
    let kept = |strict| {
        processed(
            &z,
            1,
            &SampleOptions { top_k: Some(2), strict_top_k: strict, ..Default::default() },
            Processed::Probs,
        )
        .iter()
        .filter(|v| **v > 0.0)
        .count()
    };
    assert_eq!((kept(false), kept(true)), (4, 2));
}

/// Top-p alone over a vocabulary-sized row takes the vector-exponential mass (every token,
/// no top-k cut) and must still cut exactly where the definition's libm sum does: f64 rows
/// (every level) and f32 rows, peaked and flat logits, several p, a temperature.
#[test]
fn top_p_alone_on_large_rows_matches_the_reference() {
    let mut rng = Rng(0x70b);
    for &(n, scale) in &[(40_000usize, 4.0f64), (20_000, 0.05), (3_001, 12.0)] {
        // A sum of four uniforms: bell-shaped like real logits, with a bounded top.
        let z: Vec<f64> = (0..n)
            .map(|i| {
                if i % 97 == 13 {
                    f64::NEG_INFINITY
                } else {
                    let f = ((0..4).map(|_| rng.uniform()).sum::<f64>() * scale) as f32;
                    f as f64
                }
            })
            .collect();
        let z32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
        for &pp in &[0.5, 0.9, 0.95, 0.99, 0.999_999] {
            for &temperature in &[1.0, 0.7] {
                for level in SimdLevel::available() {
                    let mut p = SampleOptions { top_p: Some(pp), temperature, ..Default::default() };
                    p.exec.simd = Some(level);
                    let want = reference(&z, &p);
                    let what = format!("n={n} scale={scale} p={pp} T={temperature} {level:?}");
                    assert_same_bits(&processed(&z, 1, &p, Processed::LogProbs), &want, &what);
                    let mut out = vec![0.0f64; n];
                    process(
                        View::rows(&z32, 1, n).unwrap(),
                        ViewMut::rows(&mut out, 1, n).unwrap(),
                        Processed::LogProbs,
                        &p,
                    )
                    .unwrap();
                    assert_same_bits(&out, &want, format!("{what} f32"));
                }
            }
        }
    }
}

/// Pearson chi-square of `counts` against probabilities `p` (cells with p = 0 must be empty).
fn chi_square(counts: &[u64], p: &[f64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let mut x2 = 0.0;
    for (c, &pi) in counts.iter().zip(p) {
        if pi == 0.0 {
            assert_eq!(*c, 0, "a removed token was drawn");
            continue;
        }
        let e = pi * total as f64;
        x2 += (*c as f64 - e).powi(2) / e;
    }
    x2
}

#[test]
fn draws_follow_the_truncated_distribution() {
    // 8 tokens; 40000 draws with fixed seeds; the 99.9% chi-square critical value for 7
    // degrees of freedom is 24.3.
    let z = [1.2f64, 0.3, -0.4, 2.0, 0.9, -1.5, 0.0, 1.7];
    let n_draws = 40_000usize;
    for p in [
        SampleOptions::default(),
        SampleOptions { temperature: 0.8, top_k: Some(5), ..Default::default() },
        SampleOptions { top_p: Some(0.8), min_p: Some(0.2), ..Default::default() },
    ] {
        let probs = processed(&z, 1, &p, Processed::Probs);
        let rows: Vec<f64> = z.iter().cycle().take(8 * n_draws).copied().collect();
        let seeds: Vec<u64> = (0..n_draws as u64).collect();
        let mut toks = vec![0u32; n_draws];
        sample::<f64, f64>(
            View::rows(&rows, n_draws, 8).unwrap(),
            Draw::Counter { seeds: &seeds, step: 3 },
            &mut toks,
            None,
            &p,
        )
        .unwrap();
        let mut counts = [0u64; 8];
        for &t in &toks {
            counts[t as usize] += 1;
        }
        let dof = probs.iter().filter(|v| **v > 0.0).count() - 1;
        let crit = [10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32][dof - 1];
        let x2 = chi_square(&counts, &probs);
        assert!(x2 < crit, "{p:?}: chi2 {x2} >= {crit}");
    }
    // Gumbel-max follows softmax(z/T).
    let mut counts = [0u64; 8];
    let rows: Vec<f64> = z.iter().cycle().take(8 * n_draws).copied().collect();
    let seeds: Vec<u64> = (0..n_draws as u64).map(|s| s * 7919).collect();
    let mut toks = vec![0u32; n_draws];
    gumbel_max(
        View::rows(&rows, n_draws, 8).unwrap(),
        GumbelSource::Counter { seeds: &seeds, step: 0 },
        &mut toks,
        &smax::sample::GumbelOptions { temperature: 1.3, k: 1, ..Default::default() },
    )
    .unwrap();
    for &t in &toks {
        counts[t as usize] += 1;
    }
    let probs = processed(&z, 1, &SampleOptions { temperature: 1.3, ..Default::default() }, Processed::Probs);
    let x2 = chi_square(&counts, &probs);
    assert!(x2 < 24.32, "gumbel chi2 {x2}");
}

#[test]
fn gumbel_worked_example_d2_and_without_replacement() {
    // D2 (on D1's logits): u = [0.3, 0.9, 0.5, 0.99, 0.2] gives
    // g = [−0.1856, 2.2504, 0.3665, 4.6001, −0.4759] and z + g peaks at index 3, then 1, 0.
    let z1 = [2.0f64, 1.0, 0.5, -1.0, -3.0];
    let u = [0.3f64, 0.9, 0.5, 0.99, 0.2];
    let mut t3 = [0u32; 3];
    gumbel_max(
        View::rows(&z1, 1, 5).unwrap(),
        GumbelSource::Uniforms(&u),
        &mut t3,
        &smax::sample::GumbelOptions { temperature: 1.0, k: 3, ..Default::default() }.par(Par::Seq),
    )
    .unwrap();
    assert_eq!(t3, [3, 1, 0]);
    assert!(matches!(
        gumbel_max(
            View::rows(&z1, 1, 5).unwrap(),
            GumbelSource::Uniforms(&[0.0, 0.5, 0.5, 0.5, 0.5]),
            &mut t3[..1],
            &smax::sample::GumbelOptions { temperature: 1.0, k: 1, ..Default::default() }.par(Par::Seq)
        ),
        Err(Error::BadParameter { name: "uniform", .. })
    ));
    // k = 3 distinct tokens, best first; masked tokens never chosen.
    let z = [0.0f64, f64::NEG_INFINITY, 1.0, 2.0, f64::NEG_INFINITY, 0.5];
    for seed in 0..200u64 {
        let mut t = [0u32; 3];
        let src = GumbelSource::Counter { seeds: &[seed], step: 9 };
        gumbel_max(
            View::rows(&z, 1, 6).unwrap(),
            src,
            &mut t,
            &smax::sample::GumbelOptions { temperature: 1.0, k: 3, ..Default::default() }.par(Par::Seq),
        )
        .unwrap();
        assert!(t.iter().all(|&i| i != 1 && i != 4));
        assert!(t[0] != t[1] && t[1] != t[2] && t[0] != t[2]);
    }
    let mut t = [0u32; 1];
    assert!(matches!(
        gumbel_max(
            View::rows(&z, 1, 6).unwrap(),
            GumbelSource::Counter { seeds: &[1], step: 0 },
            &mut t,
            &smax::sample::GumbelOptions { temperature: 1.0, k: 5, ..Default::default() }.par(Par::Seq)
        ),
        Err(Error::LengthMismatch { what: "tokens", .. })
    ));
}

#[test]
fn edge_cases_and_errors() {
    let z = [1.0f64, 3.0, 3.0, -1.0];
    let one = |z: &[f64], p: &SampleOptions| {
        let mut t = [0u32];
        sample::<f64, f64>(View::rows(z, 1, z.len()).unwrap(), Draw::Uniform(&[0.5]), &mut t, None, &(*p).par(Par::Seq))
            .map(|_| t[0])
    };
    // T = 0: argmax, lowest index on ties.
    let greedy = SampleOptions { temperature: 0.0, ..Default::default() };
    assert_eq!(one(&z, &greedy).unwrap(), 1);
    // NaN and +inf are typed errors naming the place; all −inf has no valid token.
    assert!(matches!(
        one(&[0.0, f64::NAN], &SampleOptions::default()),
        Err(Error::NonFiniteLogit { row: 0, index: 1, .. })
    ));
    assert!(matches!(one(&[f64::INFINITY, 0.0], &greedy), Err(Error::NonFiniteLogit { index: 0, .. })));
    assert!(matches!(one(&[f64::NEG_INFINITY; 3], &SampleOptions::default()), Err(Error::NoValidToken { row: 0 })));
    for (p, name) in [
        (SampleOptions { temperature: -1.0, ..Default::default() }, "temperature"),
        (SampleOptions { temperature: f64::NAN, ..Default::default() }, "temperature"),
        (SampleOptions { top_k: Some(0), ..Default::default() }, "top_k"),
        (SampleOptions { top_p: Some(0.0), ..Default::default() }, "top_p"),
        (SampleOptions { min_p: Some(1.5), ..Default::default() }, "min_p"),
    ] {
        match one(&z, &p) {
            Err(Error::BadParameter { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    let mut t = [0u32];
    assert!(matches!(
        sample::<f64, f64>(
            View::rows(&z, 1, 4).unwrap(),
            Draw::Uniform(&[1.0]),
            &mut t,
            None,
            &SampleOptions::default().par(Par::Seq)
        ),
        Err(Error::BadParameter { name: "uniform", .. })
    ));
    // k ≥ V and p = 1 are no-ops; min-p = 1 keeps the maxima.
    let full = processed(&z, 1, &SampleOptions::default(), Processed::LogProbs);
    let noop = SampleOptions { top_k: Some(10), top_p: Some(1.0), ..Default::default() };
    assert_eq!(processed(&z, 1, &noop, Processed::LogProbs), full);
    let mp1 = processed(&z, 1, &SampleOptions { min_p: Some(1.0), ..Default::default() }, Processed::Probs);
    for (a, b) in mp1.iter().zip([0.0, 0.5, 0.5, 0.0]) {
        assert!((a - b).abs() < 1e-15, "{mp1:?}");
    }
    // The counter generator is open and deterministic.
    for s in 0..1000 {
        let u = counter_uniform(s, 7);
        assert!(u > 0.0 && u < 1.0);
        assert_eq!(u, counter_uniform(s, 7));
    }
    assert_ne!(counter_u64(1, 2, 3), counter_u64(1, 2, 4));
}

#[test]
fn a_draw_depends_only_on_its_row() {
    let mut rng = Rng(3);
    let (rows, n) = (64, 3000);
    let z: Vec<f32> = rng.vec(rows * n, 5.0).iter().map(|&v| v as f32).collect();
    let seeds: Vec<u64> = (0..rows as u64).map(|r| r * 31 + 7).collect();
    let p =
        SampleOptions { temperature: 0.9, top_k: Some(200), top_p: Some(0.9), min_p: Some(0.01), ..Default::default() };
    let batch = |par: Par| {
        let mut t = vec![0u32; rows];
        let mut pr = vec![0.0f32; rows * n];
        sample(
            View::rows(&z, rows, n).unwrap(),
            Draw::Counter { seeds: &seeds, step: 11 },
            &mut t,
            Some((ViewMut::rows(&mut pr, rows, n).unwrap(), Processed::Probs)),
            &p.par(par),
        )
        .unwrap();
        (t, pr)
    };
    let base = batch(Par::Seq);
    for threads in [2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        assert!(pool.install(|| batch(Par::Rayon)) == base, "{threads} threads");
    }
    // Row 17 alone draws the same token.
    let mut t = [0u32];
    sample::<f32, f32>(
        View::rows(&z[17 * n..18 * n], 1, n).unwrap(),
        Draw::Counter { seeds: &seeds[17..18], step: 11 },
        &mut t,
        None,
        &p.par(Par::Seq),
    )
    .unwrap();
    assert_eq!(t[0], base.0[17]);
    // Processed probabilities sum to 1 per row.
    for r in 0..rows {
        let s: f64 = base.1[r * n..(r + 1) * n].iter().map(|&v| v as f64).sum();
        assert!((s - 1.0).abs() < 1e-5, "row {r}: {s}");
    }
}

/// A temperature so small that `z/T` overflows (issue 17, class 5): the largest logit is drawn
/// with probability 1, whatever the uniform; masked tokens never are; Gumbel-max returns the
/// largest first and still counts every unmasked token for `k > 1`.
#[test]
fn tiny_temperatures_draw_the_largest_logit() {
    let ninf = f64::NEG_INFINITY;
    let rows: [&[f64]; 3] = [&[ninf, 1e30, ninf], &[1.0, 2.0, 1.5, ninf], &[-3.0, -1e300, -2.0]];
    for z in rows {
        let n = z.len();
        let best = (0..n).fold(0, |b, i| if z[i] > z[b] { i } else { b });
        for temperature in [1e-310, f64::MIN_POSITIVE, 1e-300] {
            let p = SampleOptions { temperature, ..Default::default() };
            for u in [0.0, 0.5, 0.999_999] {
                let mut t = [0u32];
                let mut probs = vec![0.0f64; n];
                sample(
                    View::rows(z, 1, n).unwrap(),
                    Draw::Uniform(&[u]),
                    &mut t,
                    Some((ViewMut::rows(&mut probs, 1, n).unwrap(), Processed::Probs)),
                    &p,
                )
                .unwrap();
                assert_eq!(t[0] as usize, best, "{z:?} T={temperature} u={u}");
                let want: Vec<f64> = (0..n).map(|i| if i == best { 1.0 } else { 0.0 }).collect();
                assert_eq!(probs, want, "{z:?} T={temperature}");
            }
            let unmasked = z.iter().filter(|v| **v != ninf).count();
            let mut g = vec![0u32; unmasked];
            gumbel_max(
                View::rows(z, 1, n).unwrap(),
                GumbelSource::Counter { seeds: &[7], step: 0 },
                &mut g,
                &smax::sample::GumbelOptions { temperature, k: unmasked, ..Default::default() },
            )
            .unwrap();
            assert_eq!(g[0] as usize, best, "{z:?} T={temperature}");
            assert!(g.iter().all(|&i| z[i as usize] != ninf));
        }
    }
}

/// f32 rows go through the vector candidate search (top-k, min-p; top-p after a top-k): the
/// processed distribution equals the full-sort reference bit for bit and the draw equals the
/// f64 path's, at every SIMD level, on row lengths around every vector width and gate block,
/// with ties at the k-th value, masked entries, a lone finite entry, and temperatures small
/// enough that some `t` underflow.
#[test]
fn f32_rows_through_the_candidate_search_match_the_reference() {
    let mut rng = Rng(0x32);
    let ninf = f32::NEG_INFINITY;
    for level in smax::SimdLevel::available() {
        let exec = smax::Exec { par: Par::Seq, simd: Some(level) };
        for &n in &[1usize, 2, 7, 8, 15, 16, 17, 63, 64, 65, 100, 129, 1000, 4099, 20000] {
            for case in 0..30 {
                let z: Vec<f32> = (0..n)
                    .map(|i| match case % 5 {
                        _ if n > 1 && i % 13 == 4 => ninf,
                        // Few distinct values: ties at every boundary.
                        0 | 1 => ((rng.uniform() * 8.0).round() / 2.0) as f32,
                        2 => (rng.uniform() * 30.0) as f32,
                        // One finite entry among masked ones.
                        3 if n > 1 => {
                            if i == n / 2 {
                                3.0
                            } else {
                                ninf
                            }
                        }
                        _ => (rng.uniform() * 3.0) as f32,
                    })
                    .collect();
                let pick = |r: &mut Rng, a: f64, b: f64| a + (b - a) * (r.uniform() + 1.0) / 2.0;
                let big_k = case % 7 == 6;
                let p = SampleOptions {
                    temperature: [1.0, 0.7, 1.3, 1e-300][case % 4],
                    top_k: if case % 6 == 5 {
                        None
                    } else if big_k {
                        Some(1 + (rng.next_u64() % (n as u64 + 2)) as usize)
                    } else {
                        Some(1 + (rng.next_u64() % 60) as usize)
                    },
                    strict_top_k: case % 5 == 1,
                    top_p: if case % 3 == 0 { Some(pick(&mut rng, 0.05, 1.0)) } else { None },
                    min_p: if case % 4 < 2 { Some(pick(&mut rng, 0.0, 0.5)) } else { None },
                    exec,
                };
                let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
                if z64.iter().all(|v| *v == f64::NEG_INFINITY) {
                    continue;
                }
                let want = reference(&z64, &p);
                let mut got = vec![0.0f64; n];
                process(View::rows(&z, 1, n).unwrap(), ViewMut::rows(&mut got, 1, n).unwrap(), Processed::LogProbs, &p)
                    .unwrap();
                assert_same_bits(&got, &want, format!("{level:?} n={n} case {case} {p:?}"));
                for u in [0.0, 0.3, 0.999] {
                    let (mut a, mut b) = ([0u32], [0u32]);
                    let none = None::<(ViewMut<'_, f64>, Processed)>;
                    sample(View::rows(&z, 1, n).unwrap(), Draw::Uniform(&[u]), &mut a, none, &p).unwrap();
                    let none = None::<(ViewMut<'_, f64>, Processed)>;
                    sample(View::rows(&z64, 1, n).unwrap(), Draw::Uniform(&[u]), &mut b, none, &p).unwrap();
                    assert_eq!(a, b, "{level:?} n={n} case {case} u={u} {p:?}");
                }
                // Greedy: the first index of the max.
                let g = SampleOptions { temperature: 0.0, ..p };
                let mut a = [0u32];
                let none = None::<(ViewMut<'_, f64>, Processed)>;
                sample(View::rows(&z, 1, n).unwrap(), Draw::Uniform(&[0.5]), &mut a, none, &g).unwrap();
                let best = (0..n).fold(0, |b, i| if z64[i] > z64[b] { i } else { b });
                assert_eq!(a[0] as usize, best, "{level:?} n={n} case {case}");
            }
        }
    }
}

/// Rows whose largest logit is a zero of either sign (found by the sampling fuzz target: `max`
/// may keep either zero, and a build kept −0 where another kept +0, so the f32 and f64 paths
/// returned log-probabilities of −0 and +0). The shift is by +0 in both.
#[test]
fn signed_zero_maxima_give_the_same_bits_on_every_path() {
    let ninf = f32::NEG_INFINITY;
    let rows: [&[f32]; 4] = [&[-0.0, ninf], &[0.0, -0.0, -1.0], &[-0.0, 0.0, ninf, -0.0], &[-0.0, -0.0]];
    for z in rows {
        let n = z.len();
        let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
        for p in [
            SampleOptions { top_k: Some(1), strict_top_k: true, ..Default::default() },
            SampleOptions { top_k: Some(1), top_p: Some(0.5), ..Default::default() },
            SampleOptions { min_p: Some(0.9), ..Default::default() },
            SampleOptions { temperature: 0.5, ..Default::default() },
        ] {
            let want = reference(&z64, &p);
            let (mut a, mut b) = (vec![0.0f64; n], vec![0.0f64; n]);
            process(View::rows(z, 1, n).unwrap(), ViewMut::rows(&mut a, 1, n).unwrap(), Processed::LogProbs, &p)
                .unwrap();
            process(View::rows(&z64, 1, n).unwrap(), ViewMut::rows(&mut b, 1, n).unwrap(), Processed::LogProbs, &p)
                .unwrap();
            assert_same_bits(&a, &want, format!("f32 {z:?} {p:?}"));
            assert_same_bits(&b, &want, format!("f64 {z:?} {p:?}"));
        }
    }
}
