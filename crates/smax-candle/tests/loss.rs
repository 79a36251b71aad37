//! The linear cross-entropy and StableMax cross-entropy against compositions of candle ops
//! in f64: losses and gradients through `Var`/`backward()`.

use candle_core::{DType, Device, Result, Tensor, Var};
use smax::loss::{LinearCrossEntropyOptions, LossOptions, Reduction};

fn values(shape: &[usize], seed: usize, scale: f64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| (((i + seed) * 7919 % 1000) as f64 / 500.0 - 1.0) * scale).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

/// Cross-entropy with PyTorch's ignore and smoothing rules, composed of candle ops in f64.
fn reference_ce(logits: &Tensor, targets: &[i64], ignore: i64, smoothing: f64, mean: bool) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    let lp = candle_nn::ops::log_softmax(logits, 1)?;
    let mut onehot = vec![0.0f64; n * c];
    let mut valid = 0.0;
    for (r, &t) in targets.iter().enumerate() {
        if t == ignore {
            continue;
        }
        valid += 1.0;
        for j in 0..c {
            onehot[r * c + j] = smoothing / c as f64;
        }
        onehot[r * c + t as usize] += 1.0 - smoothing;
    }
    let q = Tensor::from_vec(onehot, (n, c), &Device::Cpu)?;
    let total = (lp * q)?.sum_all()?.neg()?;
    if mean { total / valid } else { Ok(total) }
}

#[test]
fn linear_cross_entropy_matches_the_materialised_loss_and_gradients() -> Result<()> {
    let (n, d, v) = (37, 16, 301);
    let h64 = values(&[n, d], 1, 1.0)?;
    let w64 = values(&[v, d], 5, 0.5)?;
    let targets: Vec<i64> = (0..n as i64).map(|i| if i % 7 == 3 { -100 } else { (i * 37) % v as i64 }).collect();
    let t = Tensor::new(targets.as_slice(), &Device::Cpu)?;
    for (reduction, smoothing) in [(Reduction::Mean, 0.0), (Reduction::Mean, 0.1), (Reduction::Sum, 0.0)] {
        let mean = reduction == Reduction::Mean;
        // The reference: f64 logits materialised, loss composed, gradients by candle's autograd.
        let (hr, wr) = (Var::from_tensor(&h64)?, Var::from_tensor(&w64)?);
        let want = reference_ce(&hr.matmul(&wr.t()?)?, &targets, -100, smoothing, mean)?;
        let gw = want.backward()?;
        let (h, w) = (Var::from_tensor(&h64.to_dtype(DType::F32)?)?, Var::from_tensor(&w64.to_dtype(DType::F32)?)?);
        let opts = LinearCrossEntropyOptions::default().reduction(reduction).label_smoothing(smoothing);
        let loss = smax_candle::linear_cross_entropy(&h, &w, &t, &opts)?;
        assert_eq!(loss.dtype(), DType::F32);
        let scale = want.to_scalar::<f64>()?.abs().max(1.0);
        assert!(max_abs_diff(&loss, &want)? <= 2e-6 * scale, "{reduction:?} {smoothing}");
        // Scaled upstream gradient: the stored gradients are multiplied.
        let g = (loss * 3.0)?.backward()?;
        let dh = g.get(&h).expect("dh");
        let dw = g.get(&w).expect("dw");
        let want_dh = (gw.get(&hr).expect("ref dh") * 3.0)?;
        let want_dw = (gw.get(&wr).expect("ref dw") * 3.0)?;
        let gs = if mean { 1.0 } else { n as f64 };
        assert!(max_abs_diff(dh, &want_dh)? <= 3e-6 * gs, "{reduction:?} dh");
        assert!(max_abs_diff(dw, &want_dw)? <= 3e-6 * gs, "{reduction:?} dw");
    }
    Ok(())
}

#[test]
fn linear_cross_entropy_other_dtypes_leading_dims_and_reduction_none() -> Result<()> {
    let (d, v) = (8, 50);
    let h64 = values(&[2, 3, d], 2, 1.0)?;
    let w64 = values(&[v, d], 9, 0.5)?;
    let t = Tensor::new(&[[1i64, 2, 3], [4, -100, 49]], &Device::Cpu)?;
    let flat: Vec<i64> = vec![1, 2, 3, 4, -100, 49];
    let logits = h64.reshape((6, d))?.matmul(&w64.t()?)?;
    let lp = candle_nn::ops::log_softmax(&logits, 1)?.to_vec2::<f64>()?;
    let opts = LinearCrossEntropyOptions::default().reduction(Reduction::None);
    let loss = smax_candle::linear_cross_entropy(&h64.to_dtype(DType::F32)?, &w64.to_dtype(DType::F32)?, &t, &opts)?;
    assert_eq!(loss.dims(), &[2, 3]);
    let got = loss.flatten_all()?.to_vec1::<f32>()?;
    for (r, &y) in flat.iter().enumerate() {
        let want = if y == -100 { 0.0 } else { -lp[r][y as usize] };
        assert!((got[r] as f64 - want).abs() <= 1e-5, "row {r}: {} vs {want}", got[r]);
    }
    // f16 inputs: converted to f32 and back; gradients reach the f16 variables.
    let h = Var::from_tensor(&h64.to_dtype(DType::F16)?)?;
    let w = Var::from_tensor(&w64.to_dtype(DType::F16)?)?;
    let loss = smax_candle::linear_cross_entropy(&h, &w, &t, &LinearCrossEntropyOptions::default())?;
    assert_eq!(loss.dtype(), DType::F16);
    let g = loss.backward()?;
    assert_eq!(g.get(&h).expect("dh").dtype(), DType::F16);
    assert_eq!(g.get(&w).expect("dw").dims(), &[v, d]);
    // Reduction::None is forward-only: its backward is an error, not a wrong gradient.
    let h = Var::from_tensor(&h64.to_dtype(DType::F32)?)?;
    let loss = smax_candle::linear_cross_entropy(&h, &w64.to_dtype(DType::F32)?, &t, &opts)?;
    assert!(loss.sum_all()?.backward().is_err());
    // A classifier whose width disagrees with h is an error.
    assert!(
        smax_candle::linear_cross_entropy(&h, &values(&[v, d + 1], 0, 1.0)?.to_dtype(DType::F32)?, &t, &opts).is_err()
    );
    Ok(())
}

#[test]
fn stablemax_cross_entropy_matches_its_definition() -> Result<()> {
    let x64 = values(&[5, 9], 3, 6.0)?;
    let targets = [0i64, 8, -100, 4, 2];
    let t = Tensor::new(&targets, &Device::Cpu)?;
    // s(x) = x + 1 (x ≥ 0), 1/(1 − x) below, composed in f64.
    let xr = Var::from_tensor(&x64)?;
    let pos = xr.ge(0.0)?;
    let s = pos.where_cond(&(xr.as_tensor() + 1.0)?, &(xr.as_tensor().neg()? + 1.0)?.recip()?)?;
    let lp = s.broadcast_div(&s.sum_keepdim(1)?)?.log()?;
    let mut mask = vec![0.0f64; 45];
    for (r, &y) in targets.iter().enumerate() {
        if y >= 0 {
            mask[r * 9 + y as usize] = 1.0;
        }
    }
    let want = ((lp * Tensor::from_vec(mask, (5, 9), &Device::Cpu)?)?.sum_all()?.neg()? / 4.0)?;
    let gw = want.backward()?;
    for dtype in [DType::F64, DType::F32] {
        let x = Var::from_tensor(&x64.to_dtype(dtype)?)?;
        let loss = smax_candle::stablemax_cross_entropy(&x, &t, &LossOptions::default())?;
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
        assert!(max_abs_diff(&loss, &want)? <= tol, "{dtype:?}");
        let g = loss.backward()?;
        assert!(max_abs_diff(g.get(&x).expect("grad"), gw.get(&xr).expect("ref"))? <= tol, "{dtype:?} grad");
    }
    // Per-row losses with Reduction::None, and the gradient of their weighted sum.
    let x = Var::from_tensor(&x64)?;
    let rows = smax_candle::stablemax_cross_entropy(&x, &t, &LossOptions::default().reduction(Reduction::None))?;
    assert_eq!(rows.dims(), &[5]);
    assert!((rows.sum_all()?.to_scalar::<f64>()? / 4.0 - want.to_scalar::<f64>()?).abs() <= 1e-12);
    let w = Tensor::new(&[1.0f64, 2.0, 3.0, 4.0, 5.0], &Device::Cpu)?;
    let g = (rows * &w)?.sum_all()?.backward()?;
    let gx = g.get(&x).expect("grad").to_vec2::<f64>()?;
    let gref = gw.get(&xr).expect("ref").to_vec2::<f64>()?;
    for (r, wr) in [1.0, 2.0, 0.0, 4.0, 5.0].iter().enumerate() {
        for j in 0..9 {
            assert!((gx[r][j] - gref[r][j] * 4.0 * wr).abs() <= 1e-12, "row {r} col {j}");
        }
    }
    Ok(())
}
