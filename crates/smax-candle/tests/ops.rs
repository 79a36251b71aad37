//! smax-candle's ops against candle-nn's own compositions: values and gradients through
//! `Var`/`backward()`, every float dtype, strided and transposed inputs, and the regression
//! that gradients reach upstream variables (candle-nn's `softmax_last_dim` drops them).

use candle_core::{D, DType, Device, IndexOp, Result, Tensor, Var};
use smax::loss::{CrossEntropyOptions, Reduction};

fn cpu() -> Device {
    Device::Cpu
}

/// Deterministic values in about [-4, 4].
fn values(shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| ((i * 7919 % 1000) as f64 / 125.0) - 4.0).collect();
    Tensor::from_vec(v, shape, &cpu())?.to_dtype(dtype)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

/// Tolerance of a dtype's values of magnitude ≤ 1 against an f64 composition.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-13,
        DType::F32 => 2e-6,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

#[test]
fn softmax_log_softmax_logsumexp_match_candle_every_dim_and_dtype() -> Result<()> {
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let x = values(&[3, 5, 7], dtype)?;
        let x64 = x.to_dtype(DType::F64)?;
        for dim in 0..3 {
            let want = candle_nn::ops::softmax(&x64, dim)?;
            assert!(max_abs_diff(&smax_candle::softmax(&x, dim)?, &want)? <= tol(dtype), "{dtype:?} dim {dim}");
            let want = candle_nn::ops::log_softmax(&x64, dim)?;
            let got = smax_candle::log_softmax(&x, dim)?;
            assert!(max_abs_diff(&got, &want)? <= tol(dtype) * 10.0, "{dtype:?} dim {dim}");
            let want = x64.log_sum_exp(dim)?;
            let got = smax_candle::logsumexp(&x, dim)?;
            assert_eq!(got.dims(), want.dims());
            assert!(max_abs_diff(&got, &want)? <= tol(dtype) * 10.0, "{dtype:?} dim {dim}");
            assert_eq!(got.dtype(), dtype);
        }
    }
    Ok(())
}

#[test]
fn strided_and_transposed_inputs() -> Result<()> {
    let x = values(&[6, 9], DType::F32)?;
    for t in [x.t()?, x.i((.., 2..7))?, x.i((1..5, ..))?] {
        let want = candle_nn::ops::softmax(&t.contiguous()?, D::Minus1)?;
        assert!(max_abs_diff(&smax_candle::softmax(&t, D::Minus1)?, &want)? <= 2e-6);
        let want = t.contiguous()?.log_sum_exp(0)?;
        assert!(max_abs_diff(&smax_candle::logsumexp(&t, 0)?, &want)? <= 1e-5);
    }
    Ok(())
}

#[test]
fn gradients_match_the_composition_and_reach_upstream_variables() -> Result<()> {
    for dim in [0usize, 1] {
        let w = Var::from_tensor(&values(&[4, 6], DType::F64)?)?;
        let upstream = (w.as_tensor() * 0.5)?; // gradients must flow through this to `w`
        let g = values(&[4, 6], DType::F64)?;
        let ours = (smax_candle::softmax(&upstream, dim)? * &g)?.sum_all()?;
        let theirs = (candle_nn::ops::softmax(&upstream, dim)? * &g)?.sum_all()?;
        let (go, gt) = (ours.backward()?, theirs.backward()?);
        let (a, b) = (go.get(&w).expect("gradient reaches w"), gt.get(&w).expect("composition gradient"));
        assert!(max_abs_diff(a, b)? <= 1e-14, "softmax dim {dim}");
        let ours = (smax_candle::log_softmax(&upstream, dim)? * &g)?.sum_all()?;
        let theirs = (candle_nn::ops::log_softmax(&upstream, dim)? * &g)?.sum_all()?;
        let (go, gt) = (ours.backward()?, theirs.backward()?);
        assert!(max_abs_diff(go.get(&w).unwrap(), gt.get(&w).unwrap())? <= 1e-14, "log_softmax dim {dim}");
        let ours = (smax_candle::logsumexp(&upstream, dim)? * 3.0)?.sum_all()?;
        let theirs = (upstream.log_sum_exp(dim)? * 3.0)?.sum_all()?;
        let (go, gt) = (ours.backward()?, theirs.backward()?);
        assert!(max_abs_diff(go.get(&w).unwrap(), gt.get(&w).unwrap())? <= 1e-14, "logsumexp dim {dim}");
    }
    // candle-nn's fast path has no backward: its gradient never reaches `w`.
    let w = Var::from_tensor(&values(&[2, 3], DType::F32)?)?;
    let dropped = candle_nn::ops::softmax_last_dim(w.as_tensor())?.sum_all()?.backward()?;
    assert!(dropped.get(&w).is_none());
    let kept =
        (smax_candle::softmax(w.as_tensor(), D::Minus1)? * values(&[2, 3], DType::F32)?)?.sum_all()?.backward()?;
    assert!(kept.get(&w).is_some());
    Ok(())
}

#[test]
fn temperature_and_masked_rows() -> Result<()> {
    let x = values(&[3, 8], DType::F64)?;
    let opts = smax::Options::default().temperature(0.5);
    let want = candle_nn::ops::softmax(&(&x / 0.5)?, 1)?;
    assert!(max_abs_diff(&smax_candle::softmax_with(&x, 1, &opts)?, &want)? <= 1e-13);
    let masked = Tensor::new(&[[f32::NEG_INFINITY, f32::NEG_INFINITY], [0.0, f32::NEG_INFINITY]], &cpu())?;
    let p = smax_candle::softmax(&masked, 1)?.to_vec2::<f32>()?;
    assert!(p[0].iter().all(|v| v.is_nan()));
    assert_eq!(p[1], vec![1.0, 0.0]);
    let z = smax_candle::softmax_with(&masked, 1, &smax::Options::default().masked_row(smax::MaskedRow::Zero))?;
    assert_eq!(z.to_vec2::<f32>()?[0], vec![0.0, 0.0]);
    Ok(())
}

/// candle-nn's cross-entropy with an ignore index and label smoothing, composed in f64.
fn reference_ce(x: &Tensor, y: &[i64], smoothing: f64, ignore: i64) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let lsm = candle_nn::ops::log_softmax(x, 1)?;
    let mut terms = Vec::new();
    let mut count = 0.0;
    for (i, &t) in y.iter().enumerate() {
        if t == ignore {
            continue;
        }
        let row = lsm.i(i)?;
        let nll = row.i(t as usize)?.neg()?;
        let smooth = (row.sum_all()?.neg()? / c as f64)?;
        terms.push(((nll * (1.0 - smoothing))? + (smooth * smoothing)?)?);
        count += 1.0;
    }
    let _ = n;
    Tensor::stack(&terms, 0)?.sum_all()? / count
}

#[test]
fn cross_entropy_values_and_gradients() -> Result<()> {
    let x = Var::from_tensor(&values(&[5, 7], DType::F64)?)?;
    let y = [1i64, -100, 6, 0, 3];
    let t = Tensor::new(&y, &cpu())?;
    for smoothing in [0.0, 0.1] {
        let opts = CrossEntropyOptions::default().label_smoothing(smoothing);
        let ours = smax_candle::cross_entropy(x.as_tensor(), &t, &opts)?;
        let theirs = reference_ce(x.as_tensor(), &y, smoothing, -100)?;
        assert!(max_abs_diff(&ours, &theirs)? <= 1e-14);
        let (go, gt) = ((&ours * 2.0)?.backward()?, (&theirs * 2.0)?.backward()?);
        assert!(max_abs_diff(go.get(&x).unwrap(), gt.get(&x).unwrap())? <= 1e-14, "smoothing {smoothing}");
    }
    // Plain options match candle-nn's own cross_entropy (no ignored rows there).
    let t2 = Tensor::new(&[1u32, 2, 6, 0, 3], &cpu())?;
    let ours = smax_candle::cross_entropy(x.as_tensor(), &t2, &CrossEntropyOptions::default())?;
    let theirs = candle_nn::loss::cross_entropy(x.as_tensor(), &t2)?;
    assert!(max_abs_diff(&ours, &theirs)? <= 1e-14);
    // Reduction::None: one loss per row, and a per-row upstream gradient.
    let rows =
        smax_candle::cross_entropy(x.as_tensor(), &t2, &CrossEntropyOptions::default().reduction(Reduction::None))?;
    assert_eq!(rows.dims(), &[5]);
    let w = values(&[5], DType::F64)?;
    let go = (&rows * &w)?.sum_all()?.backward()?;
    let lsm = candle_nn::ops::log_softmax(x.as_tensor(), 1)?;
    let nll = lsm.gather(&t2.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let gt = (&nll * &w)?.sum_all()?.backward()?;
    assert!(max_abs_diff(go.get(&x).unwrap(), gt.get(&x).unwrap())? <= 1e-14);
    Ok(())
}

#[test]
fn cross_entropy_probability_targets_f32_and_errors() -> Result<()> {
    let x = values(&[4, 6], DType::F32)?;
    let q = candle_nn::ops::softmax(&values(&[4, 6], DType::F32)?.affine(0.3, 0.1)?, 1)?;
    let ours = smax_candle::cross_entropy(&x, &q, &CrossEntropyOptions::default())?;
    let lsm = candle_nn::ops::log_softmax(&x.to_dtype(DType::F64)?, 1)?;
    let want = ((lsm * q.to_dtype(DType::F64)?)?.sum_all()?.neg()? / 4.0)?;
    assert!(max_abs_diff(&ours, &want)? <= 1e-6);
    let bad = Tensor::new(&[0u32, 9, 1, 2], &cpu())?;
    let err = smax_candle::cross_entropy(&x, &bad, &CrossEntropyOptions::default()).unwrap_err();
    assert!(err.to_string().contains("target 9 of row 1"), "{err}");
    let err = smax_candle::softmax(&Tensor::new(&[1u32, 2], &cpu())?, 0).unwrap_err();
    assert!(err.to_string().contains("smax-softmax"), "{err}");
    Ok(())
}
