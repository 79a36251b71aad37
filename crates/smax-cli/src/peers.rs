//! The peer implementations `smax bench` compares against (cargo feature `peers`, on by
//! default): candle-nn's `softmax_last_dim` and rten-vecmath's `Softmax` / `LogSoftmax`.

#[cfg(feature = "peers")]
pub const ENABLED: bool = true;
#[cfg(not(feature = "peers"))]
pub const ENABLED: bool = false;

/// A prepared peer call: owns its input (in the peer's own format) and runs one evaluation.
#[allow(dead_code)]
pub trait Peer {
    fn run(&mut self);
}

#[cfg(feature = "peers")]
mod imp {
    use super::Peer;
    use rayon::prelude::*;
    use rten_simd::SimdOp;
    use std::mem::MaybeUninit;

    /// candle-nn `softmax_last_dim` on a contiguous f32 CPU tensor (allocates its output: that
    /// is candle's API).
    pub struct Candle {
        x: candle_core::Tensor,
    }

    impl Peer for Candle {
        fn run(&mut self) {
            let y = candle_nn::ops::softmax_last_dim(&self.x).expect("candle softmax_last_dim");
            std::hint::black_box(y);
        }
    }

    pub fn candle(x: &[f32], rows: usize, cols: usize) -> Option<Box<dyn Peer>> {
        let t = candle_core::Tensor::from_slice(x, (rows, cols), &candle_core::Device::Cpu).ok()?;
        Some(Box::new(Candle { x: t }))
    }

    /// candle-nn `loss::cross_entropy` (log_softmax, then nll with mean) and its autograd
    /// backward, giving the gradient with respect to the logits.
    pub struct CandleCe {
        x: candle_core::Var,
        y: candle_core::Tensor,
    }

    impl Peer for CandleCe {
        fn run(&mut self) {
            let loss = candle_nn::loss::cross_entropy(self.x.as_tensor(), &self.y).expect("candle cross_entropy");
            let grads = loss.backward().expect("candle backward");
            std::hint::black_box(grads.get(self.x.as_tensor()).map(|g| g.dims().len()));
        }
    }

    pub fn candle_ce(x: &[f32], rows: usize, cols: usize, y: &[i64]) -> Option<Box<dyn Peer>> {
        let dev = candle_core::Device::Cpu;
        let v = candle_core::Var::from_slice(x, (rows, cols), &dev).ok()?;
        let yu: Vec<u32> = y.iter().map(|&t| t as u32).collect();
        let y = candle_core::Tensor::from_slice(&yu, rows, &dev).ok()?;
        Some(Box::new(CandleCe { x: v, y }))
    }

    /// candle-transformers' `LogitsProcessor` (top-k or top-p with temperature 1), one row at a
    /// time as a decoding loop calls it; rows are prepared as 1-D tensors beforehand.
    pub struct CandleSampler {
        rows: Vec<candle_core::Tensor>,
        lp: candle_transformers::generation::LogitsProcessor,
    }

    impl Peer for CandleSampler {
        fn run(&mut self) {
            for r in &self.rows {
                std::hint::black_box(self.lp.sample(r).expect("candle sample"));
            }
        }
    }

    /// `top_k` or `top_p` (one of them) for candle's sampler; `None` when neither is set.
    pub fn candle_sampler(
        x: &[f32],
        rows: usize,
        cols: usize,
        top_k: Option<usize>,
        top_p: Option<f64>,
    ) -> Option<Box<dyn Peer>> {
        use candle_transformers::generation::{LogitsProcessor, Sampling};
        let sampling = match (top_k, top_p) {
            (Some(k), None) => Sampling::TopK { k, temperature: 1.0 },
            (None, Some(p)) => Sampling::TopP { p, temperature: 1.0 },
            _ => return None,
        };
        let dev = candle_core::Device::Cpu;
        let rows = (0..rows)
            .map(|r| candle_core::Tensor::from_slice(&x[r * cols..(r + 1) * cols], cols, &dev))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        Some(Box::new(CandleSampler { rows, lp: LogitsProcessor::from_sampling(42, sampling) }))
    }

    /// rten-vecmath's single-slice `Softmax`/`LogSoftmax`, one call per row; rows spread over
    /// the current rayon pool.
    pub struct Rten<'a> {
        x: &'a [f32],
        y: Vec<MaybeUninit<f32>>,
        cols: usize,
        log: bool,
    }

    impl Peer for Rten<'_> {
        fn run(&mut self) {
            let (cols, log) = (self.cols, self.log);
            self.x.par_chunks(cols).zip(self.y.par_chunks_mut(cols)).for_each(|(a, b)| {
                if log {
                    rten_vecmath::LogSoftmax::new(a, b).dispatch();
                } else {
                    rten_vecmath::Softmax::new(a, b).dispatch();
                }
            });
        }
    }

    /// candle-nn's CPU flash attention (`flash_attn`, batch 1) on `[1, seq, heads, d]` tensors
    /// built from smax's `[heads, seq, d]` buffers.
    struct CandleFlash {
        q: candle_core::Tensor,
        k: candle_core::Tensor,
        v: candle_core::Tensor,
        scale: f32,
        causal: bool,
    }
    impl Peer for CandleFlash {
        fn run(&mut self) {
            let mask = if self.causal {
                candle_nn::attention::AttnMask::causal()
            } else {
                candle_nn::attention::AttnMask::None
            };
            let o = candle_nn::attention::flash_attn::<f32>(&self.q, &self.k, &self.v, self.scale, mask, None, None)
                .expect("candle flash_attn");
            std::hint::black_box(o);
        }
    }
    pub fn candle_flash(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads: usize,
        seq: usize,
        d: usize,
        causal: bool,
    ) -> Option<Box<dyn Peer>> {
        let dev = candle_core::Device::Cpu;
        let t = |x: &[f32]| -> Option<candle_core::Tensor> {
            candle_core::Tensor::from_slice(x, (1, heads, seq, d), &dev).ok()?.transpose(1, 2).ok()?.contiguous().ok()
        };
        Some(Box::new(CandleFlash { q: t(q)?, k: t(k)?, v: t(v)?, scale: 1.0 / (d as f32).sqrt(), causal }))
    }

    pub fn rten(x: &[f32], _rows: usize, cols: usize, log: bool) -> Option<Box<dyn Peer + '_>> {
        Some(Box::new(Rten { x, y: vec![MaybeUninit::uninit(); x.len()], cols, log }))
    }
}

#[cfg(feature = "peers")]
pub use imp::{candle, candle_ce, candle_flash, candle_sampler, rten};

#[cfg(not(feature = "peers"))]
pub fn candle_sampler(_: &[f32], _: usize, _: usize, _: Option<usize>, _: Option<f64>) -> Option<Box<dyn Peer>> {
    None
}

#[cfg(not(feature = "peers"))]
pub fn candle_ce(_: &[f32], _: usize, _: usize, _: &[i64]) -> Option<Box<dyn Peer>> {
    None
}

#[cfg(not(feature = "peers"))]
pub fn candle_flash(_: &[f32], _: &[f32], _: &[f32], _: usize, _: usize, _: usize, _: bool) -> Option<Box<dyn Peer>> {
    None
}

#[cfg(not(feature = "peers"))]
pub fn candle(_: &[f32], _: usize, _: usize) -> Option<Box<dyn Peer>> {
    None
}

#[cfg(not(feature = "peers"))]
pub fn rten(_: &[f32], _: usize, _: usize, _: bool) -> Option<Box<dyn Peer + '_>> {
    None
}
