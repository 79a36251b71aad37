//! Post-softmax quantizers (Q1–Q4) and calibration / confidence (D3–D6): worked examples,
//! round trips over the whole input range with their error bounds, edge cases, errors.

use smax::calibrate::{
    Binning, OodScore, brier_score, calibration_error, fit_temperature, mahalanobis_fit, mahalanobis_scores, ood_scores,
};
use smax::quant::{Quantizer, ZeroMode, calibrate_log_sqrt2, calibrate_sulq, dequantize, quantize};
use smax::{Error, View};

const X: [f32; 7] = [1.0, 0.5, 0.3, 0.1, 0.01, 0.001, 0.0];

fn roundtrip(q: &Quantizer, x: &[f32]) -> (Vec<u16>, Vec<f32>, smax::quant::QuantReport) {
    let mut c = vec![0u16; x.len()];
    let mut z = vec![false; x.len()];
    let mut r = vec![0.0f32; x.len()];
    let rep = quantize(x, q, &mut c, Some(&mut z), Some(&mut r)).unwrap();
    // dequantize agrees with the reconstruction quantize wrote.
    let mut d = vec![0.0f32; x.len()];
    dequantize(&c, Some(&z), q, &mut d).unwrap();
    assert_eq!(d, r);
    (c, r, rep)
}

fn close(a: &[f32], b: &[f64], tol: f64) {
    for (x, y) in a.iter().zip(b) {
        assert!((*x as f64 - y).abs() <= tol * (1.0 + y.abs()), "{a:?} vs {b:?}");
    }
}

#[test]
fn worked_examples_q1_to_q4() {
    let (c, r, _) = roundtrip(&Quantizer::Log2 { bits: 4, delta: 1.0, zero_mode: ZeroMode::ClampToMin }, &X);
    assert_eq!(c, vec![0, 1, 2, 3, 7, 10, 15]);
    close(&r, &[1.0, 0.5, 0.25, 0.125, 0.0078125, 0.0009765625, 3.0517578125e-05], 1e-9);
    let (_, r, _) = roundtrip(&Quantizer::Log2 { bits: 4, delta: 1.0, zero_mode: ZeroMode::Zero }, &X);
    assert_eq!(r[6], 0.0);
    let (c, r, _) = roundtrip(&Quantizer::LogSqrt2 { bits: 4, delta: 1.0 }, &X);
    assert_eq!(c, vec![0, 2, 3, 7, 13, 15, 15]);
    close(&r, &[1.0, 0.5, 0.3535533906, 0.0883883476, 0.0110485435, 0.0, 0.0], 1e-7);
    // Q3 with η = 0.01 and the range of X itself.
    let eta = 0.01f64;
    let q3 = |exponent| Quantizer::Sulq {
        bits: 4,
        eta,
        y_min: (0.0f64 + eta).log2(),
        y_max: (1.0f64 + eta).log2(),
        exponent,
        levels: smax::quant::SulqLevels::Bits,
    };
    let (c, r, _) = roundtrip(&q3(smax::quant::SulqExponent::Rounded), &X);
    assert_eq!(c, vec![15, 13, 11, 8, 2, 0, 0]);
    close(&r, &[0.99, 0.49, 0.24, 0.115, 0.005625, -0.0021875, -0.0021875], 1e-7);
    let (_, r, _) = roundtrip(&q3(smax::quant::SulqExponent::Exact), &X);
    close(&r[..5], &[1.0, 0.53585654744, 0.2850092776, 0.10721181727, 0.0085030298665], 1e-7);
    assert!(r[5].abs() < 1e-9 && r[6].abs() < 1e-9);
    // Q4 on [0, 1], 4 bits. The spec's 0.3 is the f64 0.3 (0.3·15 rounds to the tie 4.5 and
    // then to even, 4); our input is the f32 0.3 = 0.30000001192..., whose 4.5000002 gives 5.
    let (c, r, _) = roundtrip(&Quantizer::Uniform { bits: 4, min: 0.0, max: 1.0 }, &X);
    assert_eq!(c, vec![15, 8, 5, 2, 0, 0, 0]);
    close(&r, &[1.0, 0.5333333333, 0.3333333333, 0.1333333333, 0.0, 0.0, 0.0], 1e-7);
    // A true tie: 0.5 at 2 bits is 1.5 -> 2 (even), and at 1 bit 0.5 -> 0 (even).
    let mut c2 = [0u16; 1];
    quantize(&[0.5], &Quantizer::Uniform { bits: 2, min: 0.0, max: 1.0 }, &mut c2, None, None).unwrap();
    assert_eq!(c2[0], 2);
    quantize(&[0.5], &Quantizer::Uniform { bits: 1, min: 0.0, max: 1.0 }, &mut c2, None, None).unwrap();
    assert_eq!(c2[0], 0);
}

#[test]
fn uniform_ranges_whose_step_or_zero_point_is_not_finite_are_errors() {
    // Issue "No panic", class 6: over [−f64::MAX, f64::MAX] the step overflowed, every code
    // reconstructed to NaN, and the report said max_abs_err = 0.
    let mut c = [0u16; 1];
    let mut r = [0.0f32; 1];
    for (min, max) in [(-f64::MAX, f64::MAX), (0.0, 5e-324), (-1e308, 1e308)] {
        let q = Quantizer::Uniform { bits: 16, min, max };
        let e = quantize(&[0.5], &q, &mut c, None, Some(&mut r));
        assert!(matches!(e, Err(Error::BadParameter { .. })), "[{min}, {max}]: {e:?}");
    }
    // A one-point range stays valid (every value reconstructs to it), as does a wide finite one.
    quantize(&[0.5], &Quantizer::Uniform { bits: 8, min: 2.0, max: 2.0 }, &mut c, None, Some(&mut r)).unwrap();
    assert_eq!(r[0], 2.0);
    let rep = quantize(&[0.5], &Quantizer::Uniform { bits: 8, min: -1e300, max: 1e300 }, &mut c, None, Some(&mut r));
    assert!(rep.unwrap().max_abs_err.is_finite());
}

#[test]
fn full_range_round_trip_bounds() {
    // Every 97th f32 in [0, 1] plus the endpoints and a few ties.
    let mut x: Vec<f32> = (0..=0x3f80_0000u32).step_by(97).map(f32::from_bits).collect();
    x.extend([0.0, 1.0, 0.5, 1.0 / 512.0, 3.0 / 512.0]);
    // u8 with scale 1/256: |x̂ − x| ≤ 1/512 (+ float error), except 1.0 saturating to 255/256.
    let (c, r, rep) = roundtrip(&Quantizer::FixedPoint { bits: 8 }, &x);
    for ((&v, &h), &q) in x.iter().zip(&r).zip(&c) {
        let err = (h as f64 - v as f64).abs();
        if v as f64 > 255.5 / 256.0 {
            assert_eq!(q, 255);
        } else {
            assert!(err <= 0.5 / 256.0 + 1e-9, "{v}: {h}");
        }
    }
    assert!(rep.saturated >= 1 && rep.max_abs_err <= 1.0 / 256.0 + 1e-9);
    // Half to even at the exact ties 1/512 -> 0 and 3/512 -> 2.
    let mut cc = [0u16; 2];
    quantize(&[1.0 / 512.0, 3.0 / 512.0], &Quantizer::FixedPoint { bits: 8 }, &mut cc, None, None).unwrap();
    assert_eq!(cc, [0, 2]);
    for bits in [2u32, 4, 8, 12] {
        // Uniform: error ≤ Δ/2.
        let (_, r, _) = roundtrip(&Quantizer::Uniform { bits, min: 0.0, max: 1.0 }, &x);
        let d = 1.0 / ((1u64 << bits) - 1) as f64;
        for (&v, &h) in x.iter().zip(&r) {
            assert!((h as f64 - v as f64).abs() <= d / 2.0 + 1e-7, "uniform {bits}: {v} -> {h}");
        }
        // log2 and log√2: within a factor 2^{±1/2} (resp. 2^{±1/4}) of x above the smallest level.
        let lmin = (-(((1u64 << bits) - 1) as f64)).exp2();
        let (_, r, _) = roundtrip(&Quantizer::Log2 { bits, delta: 1.0, zero_mode: ZeroMode::Zero }, &x);
        let (_, r2, _) = roundtrip(&Quantizer::LogSqrt2 { bits, delta: 1.0 }, &x);
        for ((&v, &h), &h2) in x.iter().zip(&r).zip(&r2) {
            let v = v as f64;
            if v > 0.0 && v >= lmin {
                let ratio = h as f64 / v;
                assert!(ratio >= 2f64.powf(-0.5) - 1e-6 && ratio <= 2f64.powf(0.5) + 1e-6, "log2 {bits}: {v} -> {h}");
            }
            if v > 0.0 && v >= lmin.sqrt() {
                let ratio = h2 as f64 / v;
                assert!(
                    ratio >= 2f64.powf(-0.25) - 1e-6 && ratio <= 2f64.powf(0.25) + 1e-6,
                    "log√2 {bits}: {v} -> {h2}"
                );
            }
        }
    }
}

#[test]
fn calibration_of_quantizers_and_errors() {
    let calib: Vec<f32> = (0..10_000).map(|i| ((i as f32 * 0.37).sin().abs()).powi(8)).collect();
    let q = calibrate_log_sqrt2(&calib, 4).unwrap();
    let max = calib.iter().cloned().fold(0.0f32, f32::max);
    if let Quantizer::LogSqrt2 { delta, .. } = q {
        assert!(delta > 0.0 && delta <= max as f64 + 1e-12);
    } else {
        panic!("{q:?}");
    }
    // The chosen η is the best of the grid.
    let q = calibrate_sulq(&calib, 4, smax::quant::SulqExponent::Rounded, smax::quant::SulqLevels::Bits).unwrap();
    let mse = |q: &Quantizer| {
        let mut c = vec![0u16; calib.len()];
        quantize(&calib, q, &mut c, None, None).unwrap().mse
    };
    let best = mse(&q);
    for eta in [0.001, 0.01, 0.1, 1.0] {
        let y = |v: f32| (v as f64 + eta).log2();
        let lo = calib.iter().cloned().fold(f32::INFINITY, f32::min);
        let other = Quantizer::Sulq {
            bits: 4,
            eta,
            y_min: y(lo),
            y_max: y(max),
            exponent: smax::quant::SulqExponent::Rounded,
            levels: smax::quant::SulqLevels::Bits,
        };
        assert!(best <= mse(&other) + 1e-15);
    }
    // Errors: NaN input, bad bits, clamped inputs counted.
    let mut c = [0u16; 3];
    assert!(matches!(
        quantize(&[0.5, f32::NAN, 0.1], &Quantizer::FixedPoint { bits: 8 }, &mut c, None, None),
        Err(Error::NonFiniteLogit { index: 1, .. })
    ));
    assert!(matches!(
        quantize(&[0.5; 3], &Quantizer::FixedPoint { bits: 0 }, &mut c, None, None),
        Err(Error::BadParameter { name: "bits", .. })
    ));
    let rep = quantize(&[-0.5, 0.5, 1.5], &Quantizer::FixedPoint { bits: 8 }, &mut c, None, None).unwrap();
    assert_eq!(rep.clamped, 2);
    assert!(calibrate_sulq(&[], 4, smax::quant::SulqExponent::Rounded, smax::quant::SulqLevels::Bits).is_err());
}

const Z: [f64; 18] = [3.0, 0.0, -1.0, 2.0, 1.5, 0.0, 0.0, 4.0, 1.0, 1.0, 0.0, 2.5, 2.0, 2.0, 0.0, 0.5, 0.0, 3.0];
const Y: [i64; 6] = [0, 1, 1, 2, 1, 0];

#[test]
fn temperature_fit_d3() {
    let r = fit_temperature(View::rows(&Z, 6, 3).unwrap(), &Y, &Default::default()).unwrap();
    assert!((r.temperature - 1.4517948869833943).abs() < 1e-10, "{r:?}");
    assert!((r.nll_before - 0.8059315435021439).abs() < 1e-14);
    assert!((r.nll_after - 0.7657826958196047).abs() < 1e-14);
    assert!(r.converged && !r.capped);
    // Separable data drives T to its floor, reported as capped.
    let sep = [5.0, 0.0, 0.0, 5.0];
    let r = fit_temperature(
        View::rows(&sep, 2, 2).unwrap(),
        &[0, 1],
        &smax::calibrate::FitOptions { t_min: 1e-2, t_max: 1e3, ..Default::default() },
    )
    .unwrap();
    assert!(r.capped && (r.temperature - 1e-2).abs() < 1e-9, "{r:?}");
    // All-wrong data drives T up to its ceiling.
    let r = fit_temperature(
        View::rows(&sep, 2, 2).unwrap(),
        &[1, 0],
        &smax::calibrate::FitOptions { t_min: 1e-2, t_max: 1e3, ..Default::default() },
    )
    .unwrap();
    assert!(r.capped && (r.temperature - 1e3).abs() < 1e-6, "{r:?}");
    // Found by the `calibrate` fuzz target: at a ceiling of 1e30 the fit returned
    // 1.0000000000000002e30 (1/(1/t_max) rounds up); the result stays within [t_min, t_max].
    for t_max in [1e30, 3e7, 7.0] {
        let o = smax::calibrate::FitOptions { t_min: 1e-2, t_max, ..Default::default() };
        let r = fit_temperature(View::rows(&sep, 2, 2).unwrap(), &[1, 0], &o).unwrap();
        assert!(r.capped && r.temperature <= t_max && r.temperature >= t_max * (1.0 - 1e-9), "{t_max}: {r:?}");
    }
    assert!(fit_temperature(View::rows(&Z[..0], 0, 3).unwrap(), &[], &Default::default()).is_err());
    assert!(matches!(
        fit_temperature(View::rows(&[f64::NAN, 0.0], 1, 2).unwrap(), &[0], &Default::default()),
        Err(Error::NonFiniteLogit { .. })
    ));
}

#[test]
fn calibration_error_d4_brier_and_ood_d5() {
    let c = calibration_error(
        View::rows(&Z, 6, 3).unwrap(),
        &Y,
        &smax::calibrate::CalibrationOptions { binning: Binning::EqualWidth(15), ..Default::default() },
    )
    .unwrap();
    assert!((c.ece - 0.3812105479198361).abs() < 1e-14, "{c:?}");
    assert!((c.mce - 0.8834920740271945).abs() < 1e-14);
    let counts: Vec<usize> = c.bins.iter().map(|b| b.count).collect();
    assert_eq!(counts.iter().sum::<usize>(), 6);
    assert_eq!((counts[14], counts[8], counts[11], counts[7], counts[13]), (2, 1, 1, 1, 1));
    // Confidence exactly 1 lands in the last bin, not a phantom one; 0 is impossible for a
    // softmax max, but the bin edges are [0, 1/M).
    let one = [100.0, -100.0];
    let c1 = calibration_error(
        View::rows(&one, 1, 2).unwrap(),
        &[0],
        &smax::calibrate::CalibrationOptions { binning: Binning::EqualWidth(10), ..Default::default() },
    )
    .unwrap();
    assert_eq!(c1.bins[9].count, 1);
    // A confidence on an inner edge belongs to the bin it closes (bins are `(k/M, (k+1)/M]`):
    // equal logits give exactly 1/2 and 1/4.
    for (z, k, m, want) in [(&[0.0, 0.0][..], 2, 10, 4), (&[0.0; 4][..], 4, 4, 0), (&[0.0; 4][..], 4, 8, 1)] {
        let c = calibration_error(
            View::rows(z, 1, k).unwrap(),
            &[0],
            &smax::calibrate::CalibrationOptions { binning: Binning::EqualWidth(m), ..Default::default() },
        )
        .unwrap();
        assert_eq!(c.bins[want].count, 1, "{z:?} among {m} bins");
        assert_eq!(smax::calibrate::equal_width_bin(c.bins[want].confidence, m), want);
    }
    assert_eq!(smax::calibrate::equal_width_bin(0.0, 15), 0);
    assert_eq!(smax::calibrate::equal_width_bin(1.0, 15), 14);
    assert_eq!(smax::calibrate::equal_width_bin(f64::NAN, 15), 0);
    assert_eq!(smax::calibrate::equal_width_bin(7.0 / 15.0 + 1e-12, 15), 7);
    // Equal mass: 3 bins of 2.
    let cm = calibration_error(
        View::rows(&Z, 6, 3).unwrap(),
        &Y,
        &smax::calibrate::CalibrationOptions { binning: Binning::EqualMass(3), ..Default::default() },
    )
    .unwrap();
    assert!(cm.bins.iter().all(|b| b.count == 2));
    assert!(cm.ece >= 0.0 && cm.ece <= 1.0 && cm.ece_l2 >= cm.ece - 1e-15);
    // Brier of a perfect one-hot prediction → 0.
    let b = brier_score(View::rows(&one, 1, 2).unwrap(), &[0]).unwrap();
    assert!(b < 1e-80);
    // D5.
    let z = [2.0, 1.0, 0.1];
    let mut o = [0.0f64];
    ood_scores(
        View::rows(&z, 1, 3).unwrap(),
        &mut o,
        &smax::calibrate::OodOptions { score: OodScore::Msp, ..Default::default() },
    )
    .unwrap();
    assert!((o[0] - 0.6590011388859677).abs() < 1e-15);
    ood_scores(
        View::rows(&z, 1, 3).unwrap(),
        &mut o,
        &smax::calibrate::OodOptions { score: OodScore::NegEnergy(1.0), ..Default::default() },
    )
    .unwrap();
    assert!((o[0] - 2.4170300162778338).abs() < 1e-14);
    ood_scores(
        View::rows(&z, 1, 3).unwrap(),
        &mut o,
        &smax::calibrate::OodOptions { score: OodScore::NegEnergy(2.0), ..Default::default() },
    )
    .unwrap();
    assert!((o[0] - 3.379554701278244).abs() < 1e-14);
    ood_scores(
        View::rows(&z, 1, 3).unwrap(),
        &mut o,
        &smax::calibrate::OodOptions { score: OodScore::MaxLogit, ..Default::default() },
    )
    .unwrap();
    assert_eq!(o[0], 2.0);
    let ninf = [f64::NEG_INFINITY; 3];
    ood_scores(
        View::rows(&ninf, 1, 3).unwrap(),
        &mut o,
        &smax::calibrate::OodOptions { score: OodScore::Msp, ..Default::default() },
    )
    .unwrap();
    assert!(o[0].is_nan());
    ood_scores(
        View::rows(&ninf, 1, 3).unwrap(),
        &mut o,
        &smax::calibrate::OodOptions { score: OodScore::NegEnergy(1.0), ..Default::default() },
    )
    .unwrap();
    assert_eq!(o[0], f64::NEG_INFINITY);
}

#[test]
fn mahalanobis_d6() {
    let f = [1.0, 0.0, 1.2, 0.3, 0.8, -0.1, -1.0, 1.0, -1.3, 0.8, -0.8, 1.1];
    let y = [0i64, 0, 0, 1, 1, 1];
    let m =
        mahalanobis_fit(&f, 2, &y, 2, &smax::calibrate::MahalanobisOptions { ridge: Some(0.0), ..Default::default() })
            .unwrap();
    for (a, b) in m.covariance.iter().zip([0.0344444444, 0.0261111111, 0.0261111111, 0.0222222222]) {
        assert!((a - b).abs() < 1e-9);
    }
    let s = m.class_scores(&[0.9, 0.1]).unwrap();
    assert!((s[0] + 5.19557195571956).abs() < 1e-9 && (s[1] + 2348.516605166053).abs() < 1e-6, "{s:?}");
    let mut o = [0.0];
    mahalanobis_scores(&m, &[0.9, 0.1], &mut o).unwrap();
    assert!((o[0] + 5.19557195571956).abs() < 1e-9);
    // A singular covariance gets the default ridge.
    let g = [0.0, 0.0, 1.0, 1.0, 2.0, 2.0];
    let m = mahalanobis_fit(
        &g,
        2,
        &[0, 0, 0],
        1,
        &smax::calibrate::MahalanobisOptions { ridge: None, ..Default::default() },
    )
    .unwrap();
    assert!(m.ridge > 0.0);
}
