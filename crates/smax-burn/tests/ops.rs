//! smax-burn's operations against burn's own compositions on the Flex backend: values and
//! gradients through autodiff, every float dtype, every dimension, strided inputs, burn's
//! `CrossEntropyLoss`, attention against the composition, and errors instead of panics.

use burn::tensor::{DType, Device, Int, Tensor, TensorData, activation};
use smax::attention::{AttentionOptions, Window};
use smax::loss::{CrossEntropyOptions, Reduction};

fn dev() -> Device {
    Device::default()
}

/// Deterministic values in about [-scale, scale], as f64.
fn values<const D: usize>(shape: [usize; D], seed: usize, scale: f64) -> Tensor<D> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| ((((i + seed) * 7919) % 1000) as f64 / 500.0 - 1.0) * scale).collect();
    Tensor::from_data(TensorData::new(v, shape), (&dev(), DType::F64))
}

fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a: Vec<f64> = a.cast(DType::F64).into_data().convert::<f64>().try_to_vec::<f64>().unwrap();
    let b: Vec<f64> = b.cast(DType::F64).into_data().convert::<f64>().try_to_vec::<f64>().unwrap();
    a.iter().zip(&b).map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() }).fold(0.0, f64::max)
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-13,
        DType::F32 => 3e-6,
        DType::F16 => 3e-3,
        _ => 2e-2,
    }
}

#[test]
fn normalisers_match_burn_every_dim_and_dtype_with_gradients() {
    for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        for dim in 0..3 {
            let x64 = values([3, 5, 7], 1, 4.0);
            let w = values([3, 5, 7], 9, 1.0);
            let x = x64.clone().cast(dtype);
            assert!(
                max_abs_diff(smax_burn::softmax(x.clone(), dim).unwrap(), activation::softmax(x64.clone(), dim))
                    <= tol(dtype)
            );
            let got = smax_burn::log_softmax(x.clone(), dim).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert!(max_abs_diff(got, activation::log_softmax(x64.clone(), dim)) <= tol(dtype) * 10.0);
            let m = x64.clone().max_dim(dim);
            let want = (x64.clone() - m.clone()).exp().sum_dim(dim).log() + m;
            assert!(
                max_abs_diff(smax_burn::logsumexp(x.clone(), dim).unwrap(), want) <= tol(dtype) * 10.0,
                "{dtype:?} {dim}"
            );

            // Gradients of Σ w·f(x) against burn's compositions, in f64.
            type F = fn(Tensor<3>, usize) -> Tensor<3>;
            let cases: [(F, F); 3] = [
                (|x, d| smax_burn::softmax(x, d).unwrap(), |x, d| activation::softmax(x, d)),
                (|x, d| smax_burn::log_softmax(x, d).unwrap(), |x, d| activation::log_softmax(x, d)),
                (
                    |x, d| smax_burn::logsumexp(x, d).unwrap(),
                    |x, d| {
                        let m = x.clone().max_dim(d).detach();
                        (x - m.clone()).exp().sum_dim(d).log() + m
                    },
                ),
            ];
            for (i, (ours, theirs)) in cases.iter().enumerate() {
                let xa = x.clone().autodiff().require_grad();
                let y = ours(xa.clone(), dim);
                let wy = w.clone().cast(dtype).slice([0..y.dims()[0], 0..y.dims()[1], 0..y.dims()[2]]);
                let g = xa.grad(&(y * wy).sum().backward()).expect("grad");
                let xr = x64.clone().autodiff().require_grad();
                let yr = theirs(xr.clone(), dim);
                let wr = w.clone().slice([0..yr.dims()[0], 0..yr.dims()[1], 0..yr.dims()[2]]);
                let gr = xr.grad(&(yr * wr).sum().backward()).expect("ref grad");
                assert!(max_abs_diff(g, gr) <= tol(dtype) * 20.0, "{dtype:?} dim {dim} op {i}");
            }
        }
    }
}

#[test]
fn strided_views_and_temperature() {
    let x = values([6, 9], 3, 5.0);
    let t = x.clone().swap_dims(0, 1);
    let want = activation::softmax(t.clone(), 1);
    assert!(max_abs_diff(smax_burn::softmax(t, 1).unwrap(), want) <= 1e-13);
    let o = smax::Options::default().temperature(0.5);
    let want = activation::log_softmax(x.clone() * 2.0, 1);
    assert!(max_abs_diff(smax_burn::log_softmax_with(x, 1, &o).unwrap(), want) <= 1e-12);
}

fn targets(v: &[i64]) -> Tensor<1, Int> {
    Tensor::from_data(v, &dev())
}

#[test]
fn cross_entropy_matches_burns_loss_and_pytorchs_definitions() {
    let x64 = values([6, 5], 2, 3.0);
    let y = targets(&[0, 4, 2, 1, 3, 3]);
    // burn's own loss with padding, weights and smoothing.
    let w = vec![1.0f32, 2.0, 0.5, 1.5, 1.0];
    for (pad, weights, smoothing) in [
        (None, None, None),
        (Some(vec![3usize]), None, None),
        (Some(vec![1usize, 3]), Some(w.clone()), None),
        (None, None, Some(0.2f32)),
    ] {
        let theirs = burn::nn::loss::CrossEntropyLossConfig::new()
            .with_pad_tokens(pad.clone())
            .with_weights(weights.clone())
            .with_smoothing(smoothing)
            .init(&dev());
        let ours = smax_burn::CrossEntropyLossConfig::new()
            .with_pad_tokens(pad)
            .with_weights(weights)
            .with_smoothing(smoothing)
            .init();
        // burn's loss builds its weight and smoothing tensors in f32: the reference runs in f32.
        let xr = x64.clone().cast(DType::F32).autodiff().require_grad();
        let want = theirs.forward(xr.clone(), y.clone());
        let gr = xr.grad(&(want.clone() * 3.0).backward()).expect("ref grad");
        for dtype in [DType::F64, DType::F32] {
            let xa = x64.clone().cast(dtype).autodiff().require_grad();
            let loss = ours.forward(xa.clone(), y.clone()).unwrap();
            assert_eq!(loss.dims(), [1]);
            assert_eq!(loss.dtype(), dtype);
            assert!(max_abs_diff(loss.clone(), want.clone()) <= 2e-6, "{dtype:?}");
            let g = xa.grad(&(loss * 3.0).backward()).expect("grad");
            assert!(max_abs_diff(g, gr.clone()) <= 4e-6, "{dtype:?} grad");
        }
    }
    // Options burn's loss does not have: ignore_index, per-row losses, z-loss; checked against
    // the composition (and the z-loss by its definition).
    let y = targets(&[0, -100, 2, 1, -100, 3]);
    let o = CrossEntropyOptions::default().reduction(Reduction::None).label_smoothing(0.1);
    let want = smax_burn::composed::cross_entropy(x64.clone(), y.clone(), &o, &[]).unwrap();
    let xa = x64.clone().autodiff().require_grad();
    let rows = smax_burn::cross_entropy(xa.clone(), y.clone(), &o).unwrap();
    assert_eq!(rows.dims(), [6]);
    assert!(max_abs_diff(rows.clone(), want.clone()) <= 1e-13);
    let wr = values([6], 7, 1.0);
    let g = xa.grad(&(rows * wr.clone()).sum().backward()).expect("grad");
    let xr = x64.clone().autodiff().require_grad();
    let gr =
        xr.grad(&(smax_burn::composed::cross_entropy(xr.clone(), y.clone(), &o, &[]).unwrap() * wr).sum().backward());
    assert!(max_abs_diff(g, gr.expect("ref grad")) <= 1e-13);
    let z = smax_burn::cross_entropy(x64.clone(), y.clone(), &CrossEntropyOptions::default().z_loss(1e-2)).unwrap();
    let plain = smax_burn::cross_entropy(x64.clone(), y.clone(), &CrossEntropyOptions::default()).unwrap();
    let lse: Vec<f64> = smax_burn::logsumexp(x64.clone(), 1).unwrap().into_data().try_to_vec::<f64>().unwrap();
    let zl: f64 = [0usize, 2, 3, 5].iter().map(|&r| lse[r] * lse[r]).sum::<f64>() * 1e-2 / 4.0;
    let diff = z.into_scalar::<f64>() - plain.into_scalar::<f64>();
    assert!((diff - zl).abs() <= 1e-12, "z-loss {diff} vs {zl}");
}

fn composed_vs_flash(name: &str, hq: usize, hkv: usize, sq: usize, skv: usize, opts: AttentionOptions<'static>) {
    let d = 8;
    let q64 = values([2, hq, sq, d], 1, 1.0);
    let k64 = values([2, hkv, skv, d], 2, 1.0);
    let v64 = values([2, hkv, skv, d], 3, 1.0);
    let dout = values([2, hq, sq, d], 4, 1.0);
    let (qr, kr, vr) = (
        q64.clone().autodiff().require_grad(),
        k64.clone().autodiff().require_grad(),
        v64.clone().autodiff().require_grad(),
    );
    let want = smax_burn::composed::attention(qr.clone(), kr.clone(), vr.clone(), &opts).unwrap();
    let gr = (want.clone() * dout.clone()).sum().backward();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let t = match dtype {
            DType::F32 => 2e-5,
            DType::F16 => 4e-3,
            _ => 3e-2,
        };
        let (q, k, v) = (
            q64.clone().cast(dtype).autodiff().require_grad(),
            k64.clone().cast(dtype).autodiff().require_grad(),
            v64.clone().cast(dtype).autodiff().require_grad(),
        );
        let out = smax_burn::attention(q.clone(), k.clone(), v.clone(), &opts).unwrap();
        assert_eq!(out.dtype(), dtype);
        assert!(max_abs_diff(out.clone(), want.clone()) <= t, "{name} {dtype:?} out");
        let g = (out * dout.clone().cast(dtype)).sum().backward();
        for (x, xr, what) in [(&q, &qr, "dq"), (&k, &kr, "dk"), (&v, &vr, "dv")] {
            let e = max_abs_diff(x.grad(&g).expect("grad"), xr.grad(&gr).expect("ref grad"));
            assert!(e <= t * 4.0, "{name} {dtype:?} {what}: {e}");
        }
    }
}

#[test]
fn attention_matches_the_composition_with_gradients() {
    let o = AttentionOptions::default;
    composed_vs_flash("plain", 2, 2, 9, 13, o());
    composed_vs_flash("causal gqa", 4, 2, 5, 17, o().causal(true));
    composed_vs_flash("window", 2, 1, 16, 16, o().causal(true).window(Window { left: 3, right: 0 }));
    composed_vs_flash("softcap", 3, 3, 7, 11, o().softcap(2.0).scale(0.9).temperature(0.7));
}

/// A row-major copy.
fn dense(t: Tensor<4>) -> Tensor<4> {
    let dtype = t.dtype();
    Tensor::from_data(t.into_data(), (&dev(), dtype))
}

#[test]
fn attention_reads_bshd_views_in_place() {
    let (b, s, h, d) = (2, 11, 3, 16);
    let q = values([b, s, h, d], 5, 1.0).cast(DType::F32);
    let k = values([b, s, h, d], 6, 1.0).cast(DType::F32);
    let opts = AttentionOptions::default().causal(true);
    let strided =
        smax_burn::attention(q.clone().swap_dims(1, 2), k.clone().swap_dims(1, 2), k.clone().swap_dims(1, 2), &opts)
            .unwrap();
    let copied = smax_burn::attention(
        dense(q.swap_dims(1, 2)),
        dense(k.clone().swap_dims(1, 2)),
        dense(k.swap_dims(1, 2)),
        &opts,
    )
    .unwrap();
    assert_eq!(max_abs_diff(strided, copied), 0.0);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let x = values([3, 4], 0, 1.0);
    assert!(smax_burn::softmax(x.clone(), 2).is_err());
    assert!(smax_burn::softmax_with(x.clone(), 1, &smax::Options::default().temperature(0.0)).is_err());
    let e = smax_burn::cross_entropy(x.clone(), targets(&[0, 7, 1]), &CrossEntropyOptions::default()).unwrap_err();
    assert!(matches!(e, smax::Error::TargetOutOfRange { row: 1, .. }), "{e}");
    assert!(smax_burn::cross_entropy(x.clone(), targets(&[0, 1]), &CrossEntropyOptions::default()).is_err());
    assert!(
        smax_burn::cross_entropy(x.clone(), targets(&[0, 1, 2]), &CrossEntropyOptions::default().label_smoothing(2.0))
            .is_err()
    );
    let q = values([1, 3, 4, 8], 1, 1.0).cast(DType::F32);
    let k = values([1, 2, 4, 8], 2, 1.0).cast(DType::F32);
    assert!(smax_burn::attention(q.clone(), k.clone(), k.clone(), &AttentionOptions::default()).is_err());
    assert!(
        smax_burn::attention(q.clone(), q.clone(), q.clone(), &AttentionOptions::default().temperature(-1.0)).is_err()
    );
    // The composition (what other backends run) checks the same shapes instead of panicking.
    let k16 = values([1, 3, 4, 16], 2, 1.0).cast(DType::F32);
    assert!(smax_burn::composed::attention(q.clone(), k16.clone(), k16, &AttentionOptions::default()).is_err());
    let k2 = values([2, 3, 4, 8], 2, 1.0).cast(DType::F32);
    assert!(smax_burn::composed::attention(q.clone(), k2.clone(), k2, &AttentionOptions::default()).is_err());
    // After an error the next call works.
    assert!(smax_burn::softmax(x, 1).is_ok());
}

#[test]
fn flex_tensors_run_smax_not_the_composition() {
    // Where the two differ by definition: smax's masked-row policy and attention's empty rows.
    let x = Tensor::<2>::from_data([[f32::NEG_INFINITY, f32::NEG_INFINITY], [0.0, 1.0]], &dev());
    let o = smax::Options::default().masked_row(smax::MaskedRow::Zero);
    let p: Vec<f32> = smax_burn::softmax_with(x.clone(), 1, &o).unwrap().into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(&p[..2], &[0.0, 0.0]);
    let q = values([1, 1, 4, 8], 1, 1.0).cast(DType::F32);
    let k = values([1, 1, 2, 8], 2, 1.0).cast(DType::F32);
    let causal = AttentionOptions::default().causal(true);
    let ours: Vec<f32> = smax_burn::attention(q.clone(), k.clone(), k.clone(), &causal)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert!(ours[..16].iter().all(|&v| v == 0.0), "queries that see no key give 0");
    let theirs: Vec<f32> =
        smax_burn::composed::attention(q, k.clone(), k, &causal).unwrap().into_data().try_to_vec::<f32>().unwrap();
    assert!(theirs[0].is_nan());
    // Every row padded: smax's mean over no rows is 0.
    let all_pad = smax_burn::CrossEntropyLossConfig::new().with_pad_tokens(Some(vec![0])).init();
    let l = all_pad.forward(values([2, 3], 0, 1.0), targets(&[0, 0])).unwrap().into_scalar::<f64>();
    assert_eq!(l, 0.0);
}
