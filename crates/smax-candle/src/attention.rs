//! Flash attention as a candle op with backward.

use std::borrow::Cow;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, D, DType, Device, Layout as CLayout, Result, Shape, Storage, Tensor};
use smax::attention::{
    AttentionGrads, AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, AttnElement, HeadStrides,
    Heads,
};

use crate::smax_err;

/// One `[b, h, s, d]` operand: its elements from the first one it addresses, and its strides.
/// A tensor whose last axis is not contiguous is gathered once.
struct Operand<'a, T: Clone> {
    data: Cow<'a, [T]>,
    strides: HeadStrides,
    dims: [usize; 4],
}

fn operand<'a, T: candle_core::WithDType>(v: &'a [T], l: &CLayout, what: &str) -> Result<Operand<'a, T>> {
    let dims: [usize; 4] = l.dims().try_into().map_err(|_| {
        candle_core::Error::Msg(format!(
            "smax flash_attn: {what} must be [batch, heads, tokens, head_dim], not {:?}",
            l.dims()
        ))
    })?;
    let st = l.stride();
    if dims[3] > 1 && st[3] != 1 {
        let data = candle_core::cpu_backend::unary_map(v, l, |x| x);
        return Ok(Operand { data: Cow::Owned(data), strides: HeadStrides::bhsd(dims[1], dims[2], dims[3]), dims });
    }
    let start = l.start_offset().min(v.len());
    let strides = HeadStrides { batch: st[0], head: st[1], token: st[2] };
    Ok(Operand { data: Cow::Borrowed(&v[start..]), strides, dims })
}

impl<T: Clone> Operand<'_, T> {
    fn heads(&self) -> Heads<'_, T> {
        Heads::strided(&self.data, self.strides)
    }
}

fn shape_of<T: Clone>(q: &Operand<'_, T>, k: &Operand<'_, T>, v: &Operand<'_, T>) -> Result<AttentionShape> {
    if k.dims != v.dims || q.dims[0] != k.dims[0] || q.dims[3] != k.dims[3] {
        return Err(candle_core::Error::Msg(format!(
            "smax flash_attn: q {:?}, k {:?}, v {:?} disagree (k and v must match; batch and head_dim shared)",
            q.dims, k.dims, v.dims
        )));
    }
    Ok(AttentionShape::new(q.dims[0], q.dims[1], q.dims[2], k.dims[2], q.dims[3]).kv_heads(k.dims[1]))
}

/// The forward op; keeps the per-row log-sum-exp for the backward when an input is tracked.
struct Flash {
    opts: AttentionOptions<'static>,
    keep_lse: bool,
    lse: Mutex<Option<Vec<f32>>>,
}

impl Flash {
    fn fwd<T: AttnElement + candle_core::WithDType>(
        &self,
        [q, k, v]: [(&[T], &CLayout); 3],
    ) -> Result<(Vec<T>, Shape)> {
        let (q, k, v) = (operand(q.0, q.1, "q")?, operand(k.0, k.1, "k")?, operand(v.0, v.1, "v")?);
        let shape = shape_of(&q, &k, &v)?;
        let mut out = vec![T::default(); shape.out_len()];
        let mut lse = vec![0.0f32; shape.lse_len()];
        let inputs = AttentionInputs::new(shape, q.heads(), k.heads(), v.heads());
        smax::attention::attention(inputs, AttentionOutputs::new(&mut out, Some(&mut lse)), &self.opts)
            .map_err(smax_err)?;
        if self.keep_lse {
            *self.lse.lock().unwrap_or_else(|p| p.into_inner()) = Some(lse);
        }
        Ok((out, Shape::from(&q.dims)))
    }
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "smax-flash-attn"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok(match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                let (o, s) = self.fwd([(q, l1), (k, l2), (v, l3)])?;
                (CpuStorage::F32(o), s)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                let (o, s) = self.fwd([(q, l1), (k, l2), (v, l3)])?;
                (CpuStorage::F16(o), s)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                let (o, s) = self.fwd([(q, l1), (k, l2), (v, l3)])?;
                (CpuStorage::BF16(o), s)
            }
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "smax flash_attn takes q, k, v all f32, all f16 or all bf16 (got {:?}, {:?}, {:?})",
                    s1.dtype(),
                    s2.dtype(),
                    s3.dtype()
                )));
            }
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("smax flash_attn: backward without a tracked forward".into()))?;
        let (out, d_out) = (out.contiguous()?, d_out.to_dtype(q.dtype())?.contiguous()?);
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => self.bwd_typed::<f32>([q, k, v, &out, &d_out], &lse)?,
            DType::F16 => self.bwd_typed::<half::f16>([q, k, v, &out, &d_out], &lse)?,
            DType::BF16 => self.bwd_typed::<half::bf16>([q, k, v, &out, &d_out], &lse)?,
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other, "smax-flash-attn")),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl Flash {
    fn bwd_typed<T: AttnElement + candle_core::WithDType>(
        &self,
        tensors: [&Tensor; 5],
        lse: &[f32],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let guards = tensors.map(|t| t.storage_and_layout());
        let mut slices: Vec<(&[T], &CLayout)> = Vec::with_capacity(5);
        for (s, l) in &guards {
            let Storage::Cpu(c) = &**s else {
                return Err(candle_core::Error::Msg("smax flash_attn: backward on a non-CPU tensor".into()));
            };
            slices.push((c.as_slice::<T>()?, *l));
        }
        let (q, k, v) = (
            operand(slices[0].0, slices[0].1, "q")?,
            operand(slices[1].0, slices[1].1, "k")?,
            operand(slices[2].0, slices[2].1, "v")?,
        );
        let shape = shape_of(&q, &k, &v)?;
        let (n_out, n_kv) = (shape.out_len(), shape.kv_len_elems());
        let part = |i: usize, what: &str| -> Result<&[T]> {
            let (v, l) = slices[i];
            v.get(l.start_offset()..l.start_offset() + n_out)
                .ok_or_else(|| candle_core::Error::Msg(format!("smax flash_attn backward: {what} is not {:?}", q.dims)))
        };
        let (out, d_out) = (part(3, "out")?, part(4, "d_out")?);
        let (mut dq, mut dk, mut dv) = (vec![T::default(); n_out], vec![T::default(); n_kv], vec![T::default(); n_kv]);
        let inputs = AttentionInputs::new(shape, q.heads(), k.heads(), v.heads());
        smax::attention::attention_backward(
            inputs,
            out,
            lse,
            d_out,
            AttentionGrads::new(&mut dq, &mut dk, &mut dv),
            &self.opts,
        )
        .map_err(smax_err)?;
        let cpu = Device::Cpu;
        Ok((
            Tensor::from_vec(dq, &q.dims[..], &cpu)?,
            Tensor::from_vec(dk, &k.dims[..], &cpu)?,
            Tensor::from_vec(dv, &k.dims[..], &cpu)?,
        ))
    }
}

/// The options without borrowed bias or mask (which this adapter does not take).
fn owned(o: &AttentionOptions<'_>) -> Result<AttentionOptions<'static>> {
    o.without_borrows().ok_or_else(|| {
        candle_core::Error::Msg(
            "smax flash_attn takes causal, window, positions, scale, soft cap and temperature; \
             a borrowed bias or mask is not supported through candle"
                .into(),
        )
    })
}

/// Exact softmax attention `softmax(q·kᵀ·scale [capped, masked] / τ)·v`, blocked (FlashAttention
/// 2's online softmax over key tiles: the score matrix never exists), with backward.
///
/// `q` is `[batch, q_heads, q_len, head_dim]`, `k` and `v` `[batch, kv_heads, kv_len,
/// head_dim]` with `q_heads` a multiple of `kv_heads` (grouped-query attention), in **any
/// strides** whose last axis is contiguous: a `[batch, tokens, heads, head_dim]` tensor (a
/// fused QKV projection's layout) is passed as `x.transpose(1, 2)?` and read in place. The
/// output is contiguous `[batch, q_heads, q_len, head_dim]` in the inputs' dtype (f32, f16 or
/// bf16; f16/bf16 compute in f32). From smax's [`AttentionOptions`]: `causal` (with
/// `positions`: bottom-right by default, the last query sees the last key), a sliding
/// `window`, `scale` (default `1/sqrt(head_dim)`), Gemma 2's `softcap`, a temperature. A query
/// row that sees no key returns 0 (not NaN).
///
/// Backward: smax's flash backward (recomputes the score tiles from the saved per-row
/// log-sum-exp; `dk`/`dv` summed over grouped heads), first order. Error: f32 accumulation,
/// about `1e-6` relative for f32 against an f64 reference. Bits do not depend on the thread
/// count. Non-CPU tensors: [`attention_composed`]. Errors: a bias or mask in `opts` (not
/// taken here), shapes that disagree, options out of range.
pub fn flash_attn(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions<'_>) -> Result<Tensor> {
    let opts = owned(opts)?;
    if !q.device().is_cpu() {
        return attention_composed(q, k, v, &opts);
    }
    let keep_lse = q.track_op() || k.track_op() || v.track_op();
    q.apply_op3(k, v, Flash { opts, keep_lse, lse: Mutex::new(None) })
}

/// The same attention as [`flash_attn`] composed from candle ops (`matmul`, `tanh`, an additive
/// mask, candle-nn's softmax): what non-CPU tensors run, and an independent reference. It
/// materialises the `[batch, q_heads, q_len, kv_len]` scores. Rows that see no key give NaN
/// here (candle's softmax of an all `-inf` row), where [`flash_attn`] gives 0.
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, opts: &AttentionOptions<'_>) -> Result<Tensor> {
    let (b, hq, sq, d) = q.dims4()?;
    let (_, hkv, skv, _) = k.dims4()?;
    if hkv == 0 || hq % hkv != 0 {
        return Err(candle_core::Error::Msg(format!("q_heads {hq} is not a multiple of kv_heads {hkv}")));
    }
    let rep = hq / hkv;
    let grouped = |x: &Tensor| -> Result<Tensor> {
        if rep == 1 {
            return x.contiguous();
        }
        x.unsqueeze(2)?.expand((b, hkv, rep, skv, d))?.reshape((b, hq, skv, d))
    };
    let (k, v) = (grouped(k)?, grouped(v)?);
    let scale = opts.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
    let mut s = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(c) = opts.softcap {
        s = ((s / f64::from(c))?.tanh()? * f64::from(c))?;
    }
    s = (s / opts.temperature)?;
    if opts.causal || opts.window.is_some() {
        let mut mask = vec![f32::NEG_INFINITY; sq * skv];
        for i in 0..sq {
            mask[i * skv..(i + 1) * skv][opts.visible_keys(sq, skv, i)].fill(0.0);
        }
        let mask = Tensor::from_vec(mask, (sq, skv), q.device())?.to_dtype(s.dtype())?;
        s = s.broadcast_add(&mask)?;
    }
    candle_nn::ops::softmax(&s, D::Minus1)?.matmul(&v)
}
