//! MoE gating: the worked examples M1–M3, every (experts, k) pair up to 64 against a plain
//! full-sort reference in both orders with and without a correction bias, edge cases, errors.

mod common;

use common::Rng;
use smax::gate::{Activation, GateOptions, GateOrder, gate};
use smax::{Error, Par, View};

fn route(h: &[f64], e: usize, p: &GateOptions, bias: Option<&[f32]>) -> (Vec<u32>, Vec<f32>, smax::gate::GateStats) {
    let t = h.len() / e;
    let mut ex = vec![0u32; t * p.k];
    let mut w = vec![0.0f32; t * p.k];
    let st = gate(View::rows(h, t, e).unwrap(), bias, &mut ex, &mut w, p).unwrap();
    (ex, w, st)
}

fn close(a: &[f32], b: &[f64]) {
    for (x, y) in a.iter().zip(b) {
        assert!((*x as f64 - y).abs() <= 1e-7 * (1.0 + y.abs()), "{a:?} vs {b:?}");
    }
}

#[test]
fn worked_examples_m1_m2_m3() {
    let h = [1.0, 3.0, 2.0, -1.0];
    // M1: softmax(TopK(h)), K = 2.
    let p = GateOptions { k: 2, order: GateOrder::TopKThenSoftmax, ..Default::default() };
    let (ex, w, _) = route(&h, 4, &p, None);
    assert_eq!(ex, vec![1, 2]);
    close(&w, &[0.7310585786, 0.2689414214]);
    // Tie: [1, 2, 2, 0] with K = 1 selects index 1.
    let (ex, _, _) = route(&[1.0, 2.0, 2.0, 0.0], 4, &GateOptions { k: 1, ..p }, None);
    assert_eq!(ex, vec![1]);
    // M2: dense temperature gate (k = E keeps every expert, best first).
    for (tau, want) in [
        (2.0, [0.1743714876, 0.4739908463, 0.2874899807, 0.0641476854]),
        (1.0, [0.0889468173, 0.6572330228, 0.2417825172, 0.0120376427]),
        (0.5, [0.015871624770, 0.86656135047, 0.11727632581, 2.9069894787e-04]),
    ] {
        let p = GateOptions { k: 4, temperature: tau, ..Default::default() };
        let (ex, w, _) = route(&h, 4, &p, None);
        let mut dense = [0.0f32; 4];
        for (&x, &v) in ex.iter().zip(&w) {
            dense[x as usize] = v;
        }
        close(&dense, &want);
    }
    // M2 with the 0.05 threshold at τ = 0.5: [0, 0.880797078, 0.119202922, 0].
    let p = GateOptions { k: 4, temperature: 0.5, threshold: Some(0.05), ..Default::default() };
    let (ex, w, _) = route(&h, 4, &p, None);
    let mut dense = [0.0f32; 4];
    for (&x, &v) in ex.iter().zip(&w) {
        dense[x as usize] = v;
    }
    close(&dense, &[0.0, 0.880797078, 0.119202922, 0.0]);
    // M3: tanh activation, bias inside.
    for (tau, want) in [
        (1.0, [0.2698795061, 0.3408478477, 0.3304346833, 0.0588379629]),
        (0.5, [0.2414462002, 0.3851249666, 0.3619526937, 0.0114761395]),
    ] {
        let p = GateOptions { k: 4, temperature: tau, activation: Activation::Tanh, ..Default::default() };
        let (ex, w, _) = route(&h, 4, &p, None);
        let mut dense = [0.0f32; 4];
        for (&x, &v) in ex.iter().zip(&w) {
            dense[x as usize] = v;
        }
        close(&dense, &want);
    }
}

/// Plain reference: full sort by (selection score desc, index asc).
fn reference(h: &[f64], p: &GateOptions, bias: Option<&[f32]>) -> (Vec<u32>, Vec<f64>) {
    let e = h.len();
    let m = h.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = h.iter().map(|v| (v - m).exp()).sum();
    let prob: Vec<f64> = h.iter().map(|v| (v - m).exp() / z).collect();
    let base = match p.order {
        GateOrder::TopKThenSoftmax => h.to_vec(),
        _ => prob.clone(),
    };
    let sel: Vec<f64> = (0..e).map(|i| base[i] + bias.map_or(0.0, |b| b[i] as f64)).collect();
    let mut idx: Vec<usize> = (0..e).collect();
    idx.sort_by(|&a, &b| sel[b].partial_cmp(&sel[a]).unwrap().then(a.cmp(&b)));
    let chosen = &idx[..p.k];
    let w: Vec<f64> = match p.order {
        GateOrder::SoftmaxThenTopK { renormalize } => {
            let t: f64 = chosen.iter().map(|&i| prob[i]).sum();
            chosen.iter().map(|&i| if renormalize { prob[i] / t } else { prob[i] }).collect()
        }
        GateOrder::TopKThenSoftmax => {
            let mk = chosen.iter().map(|&i| h[i]).fold(f64::NEG_INFINITY, f64::max);
            let t: f64 = chosen.iter().map(|&i| (h[i] - mk).exp()).sum();
            chosen.iter().map(|&i| (h[i] - mk).exp() / t).collect()
        }
    };
    (chosen.iter().map(|&i| i as u32).collect(), w)
}

#[test]
fn every_experts_k_pair_up_to_64() {
    let mut rng = Rng(64);
    for e in 1..=64usize {
        let tokens = 12;
        // Quantised logits: ties at the selection boundary are common.
        let h: Vec<f64> = (0..tokens * e).map(|_| (rng.uniform() * 6.0).round() / 2.0).collect();
        let bias: Vec<f32> = (0..e).map(|i| ((i * 7) % 5) as f32 * 0.01).collect();
        for k in 1..=e {
            for order in [
                GateOrder::SoftmaxThenTopK { renormalize: false },
                GateOrder::SoftmaxThenTopK { renormalize: true },
                GateOrder::TopKThenSoftmax,
            ] {
                for b in [None, Some(&bias[..])] {
                    let p = GateOptions { k, order, ..Default::default() };
                    let (ex, w, st) = route(&h, e, &p, b);
                    for r in 0..tokens {
                        let (rex, rw) = reference(&h[r * e..(r + 1) * e], &p, b);
                        assert_eq!(&ex[r * k..(r + 1) * k], &rex[..], "e={e} k={k} {order:?} bias={}", b.is_some());
                        close(&w[r * k..(r + 1) * k], &rw);
                    }
                    assert_eq!(st.tokens_per_expert.iter().sum::<usize>(), w.iter().filter(|v| **v != 0.0).count());
                }
            }
        }
    }
}

#[test]
fn bias_selects_but_never_weighs_and_balance_statistics() {
    // The bias moves expert 3 into the top 1; its weight is its unbiased probability.
    let h = [2.0, 1.0, 0.0, 1.5];
    let bias = [0.0f32, 0.0, 0.0, 1.0];
    let p = GateOptions { k: 1, ..Default::default() };
    let (ex, w, _) = route(&h, 4, &p, Some(&bias));
    assert_eq!(ex, vec![3]);
    let z: f64 = h.iter().map(|v: &f64| v.exp()).sum();
    close(&w, &[1.5f64.exp() / z]);
    // Scaling applies after renormalisation.
    let p2 = GateOptions {
        k: 2,
        order: GateOrder::SoftmaxThenTopK { renormalize: true },
        routed_scaling_factor: 2.5,
        ..Default::default()
    };
    let (_, w, _) = route(&h, 4, &p2, None);
    assert!(((w[0] + w[1]) as f64 - 2.5).abs() < 1e-6);
    // Balanced routing gives aux loss 1; all tokens to one expert gives E·P_0.
    let h = [5.0, 0.0, 0.0, 5.0];
    let (_, _, st) = route(&h, 2, &GateOptions { k: 1, ..Default::default() }, None);
    assert_eq!(st.tokens_per_expert, vec![1, 1]);
    assert!((st.aux_loss - 1.0).abs() < 1e-12);
    // Masked experts: gate 0 and never chosen over unmasked ones, whatever their bias.
    let h = [f64::NEG_INFINITY, 1.0, f64::NEG_INFINITY, 0.0];
    let (ex, w, _) = route(&h, 4, &GateOptions { k: 3, ..Default::default() }, Some(&[9.0, 0.0, 9.0, 0.0]));
    assert_eq!(&ex[..2], &[1, 3]);
    assert_eq!(w[2], 0.0);
}

#[test]
fn errors() {
    let h = [1.0f64, f64::NAN, 0.0, 2.0];
    let mut ex = [0u32; 2];
    let mut w = [0.0f32; 2];
    let g = |h: &[f64], p: &GateOptions, ex: &mut [u32], w: &mut [f32]| {
        gate(View::rows(h, 1, 4).unwrap(), None, ex, w, &(*p).par(Par::Seq))
    };
    assert!(matches!(
        g(&h, &GateOptions::default(), &mut ex, &mut w),
        Err(Error::NonFiniteLogit { row: 0, index: 1, .. })
    ));
    assert!(matches!(
        g(&[f64::NEG_INFINITY; 4], &GateOptions::default(), &mut ex, &mut w),
        Err(Error::NoValidToken { row: 0 })
    ));
    let ok = [1.0f64, 2.0, 0.0, 2.0];
    for (p, name) in [
        (GateOptions { k: 0, ..Default::default() }, "k"),
        (GateOptions { k: 5, ..Default::default() }, "k"),
        (GateOptions { temperature: 0.0, ..Default::default() }, "temperature"),
        (GateOptions { threshold: Some(2.0), ..Default::default() }, "threshold"),
        // A weight of 1 times this overflows the f32 weights.
        (GateOptions { routed_scaling_factor: 1e300, ..Default::default() }, "routed_scaling_factor"),
        (GateOptions { routed_scaling_factor: f64::NAN, ..Default::default() }, "routed_scaling_factor"),
    ] {
        let mut ex = vec![0u32; p.k];
        let mut w = vec![0.0f32; p.k];
        match g(&ok, &p, &mut ex, &mut w) {
            Err(Error::BadParameter { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(matches!(
        gate(View::rows(&ok, 1, 4).unwrap(), Some(&[0.0; 3]), &mut ex, &mut w, &GateOptions::default().par(Par::Seq)),
        Err(Error::LengthMismatch { what: "bias", .. })
    ));
    let mut w3 = [0.0f32; 3];
    assert!(matches!(
        g(&ok, &GateOptions::default(), &mut ex, &mut w3),
        Err(Error::LengthMismatch { what: "weights", .. })
    ));
    // No tokens with a huge k: empty outputs and zero statistics (the task split used to
    // compute rows·k and overflow).
    let none: [f64; 0] = [];
    let huge = GateOptions { k: usize::MAX, ..Default::default() };
    let st = gate(View::rows(&none, 0, 4).unwrap(), None, &mut [], &mut [], &huge).unwrap();
    assert_eq!(st.tokens_per_expert, vec![0; 4]);
    assert_eq!(st.aux_loss, 0.0);
}

#[test]
fn thread_count_determinism() {
    let mut rng = Rng(5);
    let (t, e, k) = (3000, 64, 8);
    let h: Vec<f32> = rng.vec(t * e, 3.0).iter().map(|&v| v as f32).collect();
    let p = GateOptions { k, order: GateOrder::SoftmaxThenTopK { renormalize: true }, ..Default::default() };
    let run = |par: Par| {
        let mut ex = vec![0u32; t * k];
        let mut w = vec![0.0f32; t * k];
        let st = gate(View::rows(&h, t, e).unwrap(), None, &mut ex, &mut w, &p.par(par)).unwrap();
        (ex, w.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), st.aux_loss.to_bits(), st.tokens_per_expert)
    };
    let base = run(Par::Seq);
    for threads in [2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        assert!(pool.install(|| run(Par::Rayon)) == base, "{threads} threads");
    }
}

/// A correction bias that picks an expert whose softmax weight underflows to 0: the
/// renormalised weight is 1 (the log-domain renormalisation), never `0/0`; with a threshold
/// after it, the same.
#[test]
fn renormalising_underflowed_weights_gives_one() {
    let h = [0.0f64, -1000.0, -2000.0];
    let bias = [0.0f32, 1e9, 0.0];
    let renorm = GateOrder::SoftmaxThenTopK { renormalize: true };
    for threshold in [None, Some(0.1)] {
        let p = GateOptions { k: 1, order: renorm, threshold, ..Default::default() };
        let (ex, w, _) = route(&h, 3, &p, Some(&bias));
        assert_eq!((ex[0], w[0]), (1, 1.0), "threshold {threshold:?}");
    }
    // Two chosen experts that both underflow: the weights are the softmax of their scores.
    let bias2 = [0.0f32, 1e9, 1e9];
    let p = GateOptions { k: 2, order: renorm, ..Default::default() };
    let (ex, w, _) = route(&h, 3, &p, Some(&bias2));
    assert_eq!(ex, vec![1, 2]);
    assert_eq!(w, vec![1.0, 0.0]);
    // Without renormalisation a threshold still keeps the largest weight, renormalised to 1.
    let p = GateOptions { k: 1, threshold: Some(0.1), ..Default::default() };
    let (_, w, _) = route(&h, 3, &p, Some(&bias));
    assert_eq!(w[0], 1.0);
}

/// A temperature so small that `a/τ` overflows (issue 17, class 5): the top expert gets weight 1,
/// a masked expert is never routed to, and the order of the rest is the order of the logits.
#[test]
fn tiny_temperatures_route_to_the_top_expert() {
    let ninf = f64::NEG_INFINITY;
    let h = [ninf, 1e30, ninf, 5.0, 1.0, 2.0, ninf, 3.0];
    for temperature in [1e-310, f64::MIN_POSITIVE] {
        for order in [GateOrder::SoftmaxThenTopK { renormalize: false }, GateOrder::TopKThenSoftmax] {
            let p = GateOptions { k: 2, temperature, order, ..Default::default() };
            let (ex, w, _) = route(&h, 4, &p, None);
            assert_eq!(ex, vec![1, 3, 3, 1], "{order:?} τ={temperature}");
            assert_eq!(w, vec![1.0, 0.0, 1.0, 0.0], "{order:?} τ={temperature}");
        }
    }
}

/// A bias that chooses experts whose scores underflowed to `-inf` at a tiny τ: the renormalised
/// weights are those of the chosen experts' own softmax (the largest logit gets 1), never `0/0`.
#[test]
fn tiny_temperature_with_a_bias_on_underflowed_experts() {
    let h = [0.0f64, -1.0, -2.0];
    let bias = [0.0f32, 1e9, 1e9];
    for order in [GateOrder::SoftmaxThenTopK { renormalize: true }, GateOrder::TopKThenSoftmax] {
        let p = GateOptions { k: 2, temperature: 1e-310, order, ..Default::default() };
        let (ex, w, _) = route(&h, 3, &p, Some(&bias));
        let want_ex = if order == GateOrder::TopKThenSoftmax { vec![0, 1] } else { vec![1, 2] };
        assert_eq!(ex, want_ex, "{order:?}");
        assert_eq!(w, vec![1.0, 0.0], "{order:?}");
    }
}

/// A threshold after a bias that chose experts whose weights all underflowed, first an expert
/// whose activation is below another chosen one's, at a tiny τ where its score relative to
/// the chosen ones underflows too (found by the sampling fuzz target: weight NaN). The weight
/// of the one kept expert is 1.
#[test]
fn threshold_over_underflowed_chosen_weights_keeps_one() {
    let h = [0.0f64, -1.0, -2.0];
    let bias = [0.0f32, 1e9, 2e9];
    for order in [GateOrder::SoftmaxThenTopK { renormalize: false }, GateOrder::TopKThenSoftmax] {
        let p = GateOptions { k: 2, temperature: 1e-310, order, threshold: Some(0.5), ..Default::default() };
        let (ex, w, _) = route(&h, 3, &p, Some(&bias));
        let want_ex = if order == GateOrder::TopKThenSoftmax { vec![0, 1] } else { vec![2, 1] };
        assert_eq!(ex, want_ex, "{order:?}");
        assert_eq!(w, vec![1.0, 0.0], "{order:?}");
    }
}

/// The weights for a fixed chosen set and kept set, in f64: what `gate` computes once the
/// selection and the threshold are decided (they are piecewise constant).
fn weights_fixed(h: &[f64], tau: f64, p: &GateOptions, chosen: &[u32], kept: &[bool]) -> Vec<f64> {
    let act = |v: f64| match p.activation {
        Activation::Identity => v,
        Activation::Tanh => v.tanh(),
        Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
    };
    let s: Vec<f64> = h.iter().map(|&v| act(v) / tau).collect();
    let renorm = p.threshold.is_some() || !matches!(p.order, GateOrder::SoftmaxThenTopK { renormalize: false });
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = if renorm {
        chosen.iter().zip(kept).filter(|(_, k)| **k).map(|(&i, _)| (s[i as usize] - m).exp()).sum()
    } else {
        s.iter().map(|v| (v - m).exp()).sum()
    };
    chosen
        .iter()
        .zip(kept)
        .map(|(&i, &k)| if k { p.routed_scaling_factor * (s[i as usize] - m).exp() / z } else { 0.0 })
        .collect()
}

#[test]
fn backward_matches_finite_differences() {
    use smax::ViewMut;
    use smax::gate::gate_backward;
    let mut rng = Rng(77);
    let (tokens, e) = (5, 9);
    for order in [
        GateOrder::SoftmaxThenTopK { renormalize: false },
        GateOrder::SoftmaxThenTopK { renormalize: true },
        GateOrder::TopKThenSoftmax,
    ] {
        for activation in [Activation::Identity, Activation::Tanh, Activation::Sigmoid] {
            for (k, tau, threshold) in [(3, 1.0, None), (2, 0.7, None), (9, 1.3, None), (4, 0.8, Some(0.08))] {
                let p = GateOptions {
                    k,
                    order,
                    temperature: tau,
                    activation,
                    threshold,
                    routed_scaling_factor: 2.5,
                    ..Default::default()
                };
                let h = rng.vec(tokens * e, 2.0);
                let c = rng.vec(tokens * k, 1.0);
                let dw: Vec<f32> = c.iter().map(|&v| v as f32).collect();
                let (ex, w, _) = route(&h, e, &p, None);
                let mut dh = vec![0.0f64; tokens * e];
                let g = gate_backward(
                    View::rows(&h, tokens, e).unwrap(),
                    None,
                    &dw,
                    ViewMut::rows(&mut dh, tokens, e).unwrap(),
                    &p,
                )
                .unwrap();
                // L = Σ c·weights, with the routing decisions held fixed.
                let loss = |h: &[f64], tau: f64| -> f64 {
                    (0..tokens)
                        .map(|r| {
                            let chosen = &ex[r * k..(r + 1) * k];
                            let kept: Vec<bool> = w[r * k..(r + 1) * k].iter().map(|&v| v != 0.0).collect();
                            let wr = weights_fixed(&h[r * e..(r + 1) * e], tau, &p, chosen, &kept);
                            wr.iter().zip(&c[r * k..(r + 1) * k]).map(|(a, b)| a * (*b as f32 as f64)).sum::<f64>()
                        })
                        .sum()
                };
                let eps = 1e-6;
                for i in 0..tokens * e {
                    let (mut hp, mut hm) = (h.clone(), h.clone());
                    hp[i] += eps;
                    hm[i] -= eps;
                    let fd = (loss(&hp, tau) - loss(&hm, tau)) / (2.0 * eps);
                    assert!((dh[i] - fd).abs() <= 1e-7 + 1e-6 * fd.abs(), "{p:?}: dlogits[{i}] {} vs {fd}", dh[i]);
                }
                let fd = (loss(&h, tau + eps) - loss(&h, tau - eps)) / (2.0 * eps);
                assert!((g.temperature - fd).abs() <= 1e-7 + 1e-6 * fd.abs(), "{p:?}: dtau {} vs {fd}", g.temperature);
                // The forward the test holds fixed is the forward `gate` computed.
                for r in 0..tokens {
                    let kept: Vec<bool> = w[r * k..(r + 1) * k].iter().map(|&v| v != 0.0).collect();
                    let want = weights_fixed(&h[r * e..(r + 1) * e], tau, &p, &ex[r * k..(r + 1) * k], &kept);
                    close(&w[r * k..(r + 1) * k], &want);
                }
            }
        }
    }
    // Masked experts get no gradient; a bad dlogits shape is an error.
    let p = GateOptions { k: 2, ..Default::default() };
    let h = [1.0, f64::NEG_INFINITY, 0.5, -0.3];
    let mut dh = [7.0f64; 4];
    gate_backward(View::rows(&h, 1, 4).unwrap(), None, &[1.0, -1.0], ViewMut::rows(&mut dh, 1, 4).unwrap(), &p)
        .unwrap();
    assert_eq!(dh[1], 0.0);
    let mut short = [0.0f64; 3];
    assert!(
        gate_backward(View::rows(&h, 1, 4).unwrap(), None, &[1.0, -1.0], ViewMut::rows(&mut short, 1, 3).unwrap(), &p)
            .is_err()
    );
    assert!(
        gate_backward(View::rows(&h, 1, 4).unwrap(), None, &[1.0], ViewMut::rows(&mut dh, 1, 4).unwrap(), &p).is_err()
    );
}
