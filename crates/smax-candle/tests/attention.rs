//! `flash_attn` against the composition of candle ops (`attention_composed`) in f64: outputs and
//! gradients through `Var`, causal, window, soft cap, grouped heads, `bshd` inputs read through
//! their strides, f16/bf16, and rows that see no key.

use candle_core::{DType, Device, Result, Tensor, Var};
use smax::attention::{AttentionOptions, QueryPositions, Window};

fn values(shape: &[usize], seed: usize) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f64 / 500.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

struct Case {
    name: &'static str,
    hq: usize,
    hkv: usize,
    sq: usize,
    skv: usize,
    opts: AttentionOptions<'static>,
}

fn cases() -> Vec<Case> {
    let o = AttentionOptions::default;
    vec![
        Case { name: "plain", hq: 2, hkv: 2, sq: 9, skv: 13, opts: o() },
        Case { name: "causal", hq: 2, hkv: 2, sq: 13, skv: 13, opts: o().causal(true) },
        Case { name: "causal gqa chunk", hq: 4, hkv: 2, sq: 5, skv: 17, opts: o().causal(true) },
        Case {
            name: "window",
            hq: 2,
            hkv: 1,
            sq: 16,
            skv: 16,
            opts: o().causal(true).window(Window { left: 3, right: 0 }),
        },
        Case {
            name: "softcap scale temp",
            hq: 3,
            hkv: 3,
            sq: 7,
            skv: 11,
            opts: o().softcap(2.0).scale(0.9).temperature(0.7),
        },
        Case {
            name: "offset",
            hq: 2,
            hkv: 2,
            sq: 6,
            skv: 10,
            opts: o().causal(true).positions(QueryPositions::Offset(2)),
        },
    ]
}

#[test]
fn outputs_and_gradients_match_the_composition() -> Result<()> {
    let (b, d) = (2, 8);
    for c in cases() {
        let q64 = values(&[b, c.hq, c.sq, d], 1)?;
        let k64 = values(&[b, c.hkv, c.skv, d], 2)?;
        let v64 = values(&[b, c.hkv, c.skv, d], 3)?;
        let dout = values(&[b, c.hq, c.sq, d], 4)?;
        let (qr, kr, vr) = (Var::from_tensor(&q64)?, Var::from_tensor(&k64)?, Var::from_tensor(&v64)?);
        let want = smax_candle::attention_composed(&qr, &kr, &vr, &c.opts)?;
        let gw = (&want * &dout)?.sum_all()?.backward()?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let tol = match dtype {
                DType::F32 => 2e-5,
                DType::F16 => 4e-3,
                _ => 3e-2,
            };
            let (q, k, v) = (
                Var::from_tensor(&q64.to_dtype(dtype)?)?,
                Var::from_tensor(&k64.to_dtype(dtype)?)?,
                Var::from_tensor(&v64.to_dtype(dtype)?)?,
            );
            let out = smax_candle::flash_attn(&q, &k, &v, &c.opts)?;
            assert_eq!(out.dims(), want.dims());
            assert_eq!(out.dtype(), dtype);
            assert!(max_abs_diff(&out, &want)? <= tol, "{} {dtype:?} out", c.name);
            let g = (&out * dout.to_dtype(dtype)?)?.sum_all()?.backward()?;
            for (x, xr, what) in [(&q, &qr, "dq"), (&k, &kr, "dk"), (&v, &vr, "dv")] {
                let e = max_abs_diff(g.get(x).expect("grad"), gw.get(xr).expect("ref grad"))?;
                assert!(e <= tol * 4.0, "{} {dtype:?} {what}: {e}", c.name);
            }
        }
    }
    Ok(())
}

#[test]
fn bshd_inputs_are_read_through_their_strides() -> Result<()> {
    // A fused projection's layout: [b, s, h, d], passed transposed (a view, no copy).
    let (b, s, h, d) = (2, 11, 3, 16);
    let qs = values(&[b, s, h, d], 5)?.to_dtype(DType::F32)?;
    let ks = values(&[b, s, h, d], 6)?.to_dtype(DType::F32)?;
    let vs = values(&[b, s, h, d], 7)?.to_dtype(DType::F32)?;
    let opts = AttentionOptions::default().causal(true);
    let (q, k, v) = (Var::from_tensor(&qs)?, Var::from_tensor(&ks)?, Var::from_tensor(&vs)?);
    let out = smax_candle::flash_attn(&q.transpose(1, 2)?, &k.transpose(1, 2)?, &v.transpose(1, 2)?, &opts)?;
    let want = smax_candle::flash_attn(
        &qs.transpose(1, 2)?.contiguous()?,
        &ks.transpose(1, 2)?.contiguous()?,
        &vs.transpose(1, 2)?.contiguous()?,
        &opts,
    )?;
    assert_eq!(max_abs_diff(&out, &want)?, 0.0, "strided and contiguous give the same bits");
    // Gradients come back in the variables' own [b, s, h, d] shape.
    let g = out.sum_all()?.backward()?;
    assert_eq!(g.get(&q).expect("dq").dims(), &[b, s, h, d]);
    let qr = Var::from_tensor(&qs.to_dtype(DType::F64)?)?;
    let want = smax_candle::attention_composed(
        &qr.transpose(1, 2)?,
        &ks.to_dtype(DType::F64)?.transpose(1, 2)?,
        &vs.to_dtype(DType::F64)?.transpose(1, 2)?,
        &opts,
    )?;
    let gr = want.sum_all()?.backward()?;
    assert!(max_abs_diff(g.get(&q).expect("dq"), gr.get(&qr).expect("ref"))? <= 2e-5);
    // A non-contiguous last axis is gathered, not misread.
    let qt = qs.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
    let got = smax_candle::flash_attn(&qt, &ks, &vs, &opts)?;
    assert_eq!(max_abs_diff(&got, &smax_candle::flash_attn(&qs, &ks, &vs, &opts)?)?, 0.0);
    Ok(())
}

#[test]
fn rows_that_see_no_key_give_zero_and_bad_input_is_an_error() -> Result<()> {
    // Four queries, two keys, bottom-right causal: the first two queries see no key.
    let q = values(&[1, 1, 4, 8], 1)?.to_dtype(DType::F32)?;
    let k = values(&[1, 1, 2, 8], 2)?.to_dtype(DType::F32)?;
    let out = smax_candle::flash_attn(&q, &k, &k, &AttentionOptions::default().causal(true))?;
    let rows = out.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
    assert!(rows[0].iter().chain(&rows[1]).all(|&x| x == 0.0));
    assert!(rows[3].iter().any(|&x| x != 0.0));
    // Heads that do not group, mixed dtypes, f64 and wrong ranks are errors, not panics.
    let k3 = values(&[1, 3, 2, 8], 2)?.to_dtype(DType::F32)?;
    let q2 = values(&[1, 2, 4, 8], 1)?.to_dtype(DType::F32)?;
    let o = AttentionOptions::default();
    assert!(smax_candle::flash_attn(&q2, &k3, &k3, &o).is_err());
    assert!(smax_candle::flash_attn(&q, &k.to_dtype(DType::F16)?, &k, &o).is_err());
    assert!(
        smax_candle::flash_attn(&q.to_dtype(DType::F64)?, &k.to_dtype(DType::F64)?, &k.to_dtype(DType::F64)?, &o)
            .is_err()
    );
    assert!(smax_candle::flash_attn(&q.squeeze(0)?, &k.squeeze(0)?, &k.squeeze(0)?, &o).is_err());
    assert!(smax_candle::flash_attn(&q, &k, &k, &o.temperature(0.0)).is_err());
    Ok(())
}
