//! Property tests of the loss, sampling and gating families: invariants that hold for every
//! input, checked on random ones.

#![allow(clippy::needless_range_loop)]

use proptest::prelude::*;
use smax::gate::{GateOptions, GateOrder, gate};
use smax::loss::{CrossEntropyOptions, RowOutputs, Targets, cross_entropy};
use smax::sample::{Processed, SampleOptions, process};
use smax::{Par, View, ViewMut};

fn logits(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-30.0f32..30.0, 1..max_len)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Cross-entropy with a hard target: loss ≥ 0, invariant to shifting the logits, and the
    /// gradient of each row sums to 0 (softmax minus one-hot).
    #[test]
    fn cross_entropy_invariants(x in logits(300), t in 0usize..300, shift in -50.0f32..50.0) {
        let k = x.len();
        let t = (t % k) as i64;
        let run = |x: &[f32]| {
            let mut g = vec![0.0f32; k];
            let r = cross_entropy(
                View::rows(x, 1, k).unwrap(),
                Targets::Classes(&[t]),
                Some(ViewMut::rows(&mut g, 1, k).unwrap()),
                RowOutputs::default(),
                &CrossEntropyOptions::default(),
            )
            .unwrap();
            (r.loss, g)
        };
        let (l, g) = run(&x);
        prop_assert!(l >= -1e-6, "loss {l}");
        let s: f64 = g.iter().map(|&v| v as f64).sum();
        prop_assert!(s.abs() < 1e-5, "gradient sum {s}");
        let xs: Vec<f32> = x.iter().map(|v| v + shift).collect();
        let (l2, _) = run(&xs);
        // Shifting rounds each logit once: |Δ| ≤ 2·ulp(60) ≈ 1e-5 per logit in the loss.
        prop_assert!((l - l2).abs() <= 2e-5 * (1.0 + l.abs()), "{l} vs {l2}");
    }

    /// Sampling filters keep a nonempty set whose probabilities sum to 1; top-k keeps at least
    /// k (exactly k when strict), top-p keeps a set whose mass before its last token is < p.
    #[test]
    fn sampling_invariants(x in logits(400), k in 1usize..50, p in 0.01f64..1.0, strict: bool) {
        let n = x.len();
        let z: Vec<f64> = x.iter().map(|&v| (v as f64 / 4.0).round()).collect(); // many ties
        let probs = |sp: &SampleOptions| {
            let mut o = vec![0.0f64; n];
            process(View::rows(&z, 1, n).unwrap(), ViewMut::rows(&mut o, 1, n).unwrap(), Processed::Probs, &(*sp).par(Par::Seq))
                .unwrap();
            o
        };
        let topk = probs(&SampleOptions { top_k: Some(k), strict_top_k: strict, ..Default::default() });
        let kept = topk.iter().filter(|v| **v > 0.0).count();
        if strict || k >= n {
            prop_assert_eq!(kept, k.min(n));
        } else {
            prop_assert!(kept >= k);
        }
        prop_assert!((topk.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let full = probs(&SampleOptions::default());
        let topp = probs(&SampleOptions { top_p: Some(p), ..Default::default() });
        let mut kept_p: Vec<f64> = (0..n).filter(|&i| topp[i] > 0.0).map(|i| full[i]).collect();
        prop_assert!(!kept_p.is_empty());
        kept_p.sort_by(|a, b| b.partial_cmp(a).unwrap());
        let before_last: f64 = kept_p[..kept_p.len() - 1].iter().sum();
        prop_assert!(before_last < p + 1e-12, "mass before the last kept token {before_last} >= p {p}");
        // Every removed token is no more likely than every kept one.
        let min_kept = kept_p.last().copied().unwrap_or(0.0);
        for i in 0..n {
            if topp[i] == 0.0 {
                prop_assert!(full[i] <= min_kept + 1e-15);
            }
        }
    }

    /// Gating: k distinct experts, weights in [0, 1] that sum to ≤ 1 (= 1 when renormalised),
    /// chosen experts at least as likely as any unchosen one (softmax then top-k, no bias).
    #[test]
    fn gating_invariants(x in prop::collection::vec(-8.0f32..8.0, 1..64), k in 1usize..64, renorm: bool) {
        let e = x.len();
        let k = 1 + (k - 1) % e;
        let p = GateOptions { k, order: GateOrder::SoftmaxThenTopK { renormalize: renorm }, ..Default::default() };
        let mut ex = vec![0u32; k];
        let mut w = vec![0.0f32; k];
        gate(View::rows(&x, 1, e).unwrap(), None, &mut ex, &mut w, &p.par(Par::Seq)).unwrap();
        let mut seen = ex.clone();
        seen.sort();
        seen.dedup();
        prop_assert_eq!(seen.len(), k);
        let s: f32 = w.iter().sum();
        prop_assert!(w.iter().all(|&v| (0.0..=1.0).contains(&v)));
        if renorm { prop_assert!((s - 1.0).abs() < 1e-5) } else { prop_assert!(s <= 1.0 + 1e-5) }
        let min_chosen = ex.iter().map(|&i| x[i as usize]).fold(f32::INFINITY, f32::min);
        for i in 0..e {
            if !ex.contains(&(i as u32)) {
                prop_assert!(x[i] <= min_chosen);
            }
        }
    }
}
