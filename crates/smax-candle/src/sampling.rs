//! A drop-in for candle-transformers' `LogitsProcessor`, backed by smax's exact sampler.

use candle_core::{DType, Device, Result, Storage, Tensor};
use smax::sample::{Draw, GumbelOptions, GumbelSource, Processed, SampleOptions};
use smax::{Element, Layout, View, ViewMut};

use crate::smax_err;

/// How to draw the next token: candle-transformers' `Sampling` variants, plus min-p.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token (lowest index on ties).
    ArgMax,
    /// A draw from `softmax(logits / temperature)`.
    All {
        /// `T ≥ 0` (0: greedy).
        temperature: f64,
    },
    /// Top-k: a draw among the k most likely tokens (exactly k, ties broken by index), renormalised.
    TopK {
        /// `k ≥ 1`.
        k: usize,
        /// `T ≥ 0`.
        temperature: f64,
    },
    /// Top-p (nucleus): the smallest set of most likely tokens whose mass reaches `p`.
    TopP {
        /// `p` in `(0, 1]`.
        p: f64,
        /// `T ≥ 0`.
        temperature: f64,
    },
    /// Top-k, then top-p over the k survivors **renormalised** (Hugging Face's order and
    /// definition; candle-transformers compares `p` with the survivors' unrenormalised mass).
    TopKThenTopP {
        /// `k ≥ 1`.
        k: usize,
        /// `p` in `(0, 1]`.
        p: f64,
        /// `T ≥ 0`.
        temperature: f64,
    },
    /// Gumbel-max: `argmax(logits/T + g)` with Gumbel noise from the seeded generator (exactly
    /// a draw from `softmax(logits/T)`).
    GumbelSoftmax {
        /// `T > 0`.
        temperature: f64,
    },
    /// Min-p: the tokens whose probability is at least `p` times the largest.
    MinP {
        /// `p` in `[0, 1]`.
        p: f64,
        /// `T ≥ 0`.
        temperature: f64,
    },
}

/// Samples token ids from logits, with the constructor and `sample` method of
/// candle-transformers' `LogitsProcessor`, computed by smax:
///
/// - **Exact filtering without a sort.** Top-k, top-p and min-p keep exactly the set a full sort
///   of the vocabulary would (ties at a boundary broken by index), found by smax's candidate
///   search (two vector passes over f32 logits for top-k and min-p) and renormalised in f64.
/// - **Reproducible.** Each draw's uniform is smax's counter-based generator keyed by
///   `(seed, step)`: the `n`-th call of a processor made with seed `s` draws the same token for
///   the same logits, whatever else ran before, the thread count or the batch it was in. The
///   step advances by one per `sample` call (per batch for the batched calls).
/// - **Batched.** [`LogitsProcessor::sample_batch`] samples every row of `[batch, vocab]`
///   logits in parallel, row `r` with seed `seed·2³² + r`, or one seed per row with
///   [`LogitsProcessor::sample_batch_seeded`].
///
/// Logits of any float dtype on any device (others than f64 are read as f32; non-CPU tensors
/// are copied to the CPU). NaN or `+inf` logits, and rows with no finite logit, are errors
/// naming the row. It draws from the same distribution as candle-transformers' processor
/// with the same [`Sampling`], not the same tokens (the generators differ), except for
/// `TopKThenTopP`, whose top-p here is renormalised over the top-k survivors.
#[derive(Debug, Clone)]
pub struct LogitsProcessor {
    seed: u64,
    step: u64,
    sampling: Sampling,
}

impl LogitsProcessor {
    /// A processor drawing with `sampling`, seeded with `seed`, at step 0.
    pub fn from_sampling(seed: u64, sampling: Sampling) -> Self {
        LogitsProcessor { seed, step: 0, sampling }
    }

    /// candle-transformers' constructor: greedy when `temperature` is `None` or below `1e-7`,
    /// else `All` or, with `top_p`, `TopP`.
    pub fn new(seed: u64, temperature: Option<f64>, top_p: Option<f64>) -> Self {
        let sampling = match temperature.filter(|&t| t >= 1e-7) {
            None => Sampling::ArgMax,
            Some(temperature) => match top_p {
                None => Sampling::All { temperature },
                Some(p) => Sampling::TopP { p, temperature },
            },
        };
        Self::from_sampling(seed, sampling)
    }

    /// The decoding step the next call draws at.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Sets the step of the next draw (to replay a generation from a given position).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// The sampling rule.
    pub fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    /// The next token for `logits` (`[vocab]`, or `[1, vocab]`).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let v = logits.dims().last().copied().unwrap_or(0);
        let t = self.sample_batch_seeded(&logits.reshape((1, v))?, &[self.seed])?;
        Ok(t[0])
    }

    /// candle-transformers' `sample_f`: `f` edits the probabilities `softmax(logits/T)` (f32)
    /// before the filters and the draw, which then run on their logarithms at temperature 1.
    /// Under `ArgMax` the edited probabilities' argmax is taken.
    pub fn sample_f(&mut self, logits: &Tensor, f: impl FnOnce(&mut [f32])) -> Result<u32> {
        let t = self.temperature().unwrap_or(1.0);
        let x = logits.flatten_all()?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let mut p = vec![0.0f32; x.len()];
        let opts = smax::Options::default().temperature(if t > 0.0 { t } else { 1.0 });
        let l = Layout::rows(1, x.len());
        smax::softmax(View::new(&x, l).map_err(smax_err)?, ViewMut::new(&mut p, l).map_err(smax_err)?, &opts)
            .map_err(smax_err)?;
        f(&mut p);
        let lp: Vec<f32> = p.iter().map(|&v| v.ln()).collect();
        let mut edited = self.clone();
        edited.sampling = with_temperature(&self.sampling, 1.0);
        let tok = edited.draw(&lp, 1, &[self.seed])?;
        self.step += 1;
        Ok(tok[0])
    }

    /// One token per row of `logits` (`[batch, vocab]`), rows in parallel, row `r` drawn with
    /// the seed `seed·2³² + r` (wrapping), so rows of identical logits draw independently.
    pub fn sample_batch(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        let (b, _) = logits.dims2()?;
        let seeds: Vec<u64> = (0..b as u64).map(|r| self.seed.wrapping_mul(1 << 32).wrapping_add(r)).collect();
        self.sample_batch_seeded(logits, &seeds)
    }

    /// One token per row of `logits` (`[batch, vocab]`), row `r` drawn with `seeds[r]` at this
    /// processor's step (one request per row, each reproducible on its own).
    pub fn sample_batch_seeded(&mut self, logits: &Tensor, seeds: &[u64]) -> Result<Vec<u32>> {
        let (b, v) = logits.dims2()?;
        if seeds.len() != b {
            return Err(candle_core::Error::Msg(format!("{} seeds for {b} rows", seeds.len())));
        }
        let x = logits.to_device(&Device::Cpu)?;
        let x = if x.dtype() == DType::F64 { x } else { x.to_dtype(DType::F32)? };
        let x = x.contiguous()?;
        let (s, l) = x.storage_and_layout();
        let Storage::Cpu(c) = &*s else {
            return Err(candle_core::Error::Msg("smax sampling: logits not on the CPU after the copy".into()));
        };
        let start = l.start_offset();
        let tokens = match x.dtype() {
            DType::F64 => self.draw(&c.as_slice::<f64>()?[start..start + b * v], b, seeds)?,
            _ => self.draw(&c.as_slice::<f32>()?[start..start + b * v], b, seeds)?,
        };
        self.step += 1;
        Ok(tokens)
    }

    fn temperature(&self) -> Option<f64> {
        match self.sampling {
            Sampling::ArgMax => None,
            Sampling::All { temperature }
            | Sampling::TopK { temperature, .. }
            | Sampling::TopP { temperature, .. }
            | Sampling::TopKThenTopP { temperature, .. }
            | Sampling::GumbelSoftmax { temperature }
            | Sampling::MinP { temperature, .. } => Some(temperature),
        }
    }

    /// The draw over `rows` contiguous rows of `x`.
    fn draw<T: Element>(&self, x: &[T], rows: usize, seeds: &[u64]) -> Result<Vec<u32>> {
        let l = Layout::rows(rows, x.len().checked_div(rows).unwrap_or(0));
        let view = View::new(x, l).map_err(smax_err)?;
        let mut tokens = vec![0u32; rows];
        if let Sampling::GumbelSoftmax { temperature } = self.sampling {
            let src = GumbelSource::Counter { seeds, step: self.step };
            smax::sample::gumbel_max(view, src, &mut tokens, &GumbelOptions::default().temperature(temperature))
                .map_err(smax_err)?;
            return Ok(tokens);
        }
        let o = SampleOptions::default();
        let opts = match self.sampling {
            Sampling::ArgMax => o.temperature(0.0),
            Sampling::All { temperature } => o.temperature(temperature),
            Sampling::TopK { k, temperature } => o.temperature(temperature).top_k(k).strict_top_k(true),
            Sampling::TopP { p, temperature } => o.temperature(temperature).top_p(p),
            Sampling::TopKThenTopP { k, p, temperature } => {
                o.temperature(temperature).top_k(k).strict_top_k(true).top_p(p)
            }
            Sampling::MinP { p, temperature } => o.temperature(temperature).min_p(p),
            Sampling::GumbelSoftmax { .. } => unreachable!("handled above"),
        };
        let draw = Draw::Counter { seeds, step: self.step };
        smax::sample::sample(view, draw, &mut tokens, None::<(ViewMut<'_, f32>, Processed)>, &opts)
            .map_err(smax_err)?;
        Ok(tokens)
    }
}

/// `s` with its temperature replaced (ArgMax unchanged).
fn with_temperature(s: &Sampling, t: f64) -> Sampling {
    let mut s = s.clone();
    match &mut s {
        Sampling::ArgMax => {}
        Sampling::All { temperature }
        | Sampling::TopK { temperature, .. }
        | Sampling::TopP { temperature, .. }
        | Sampling::TopKThenTopP { temperature, .. }
        | Sampling::GumbelSoftmax { temperature }
        | Sampling::MinP { temperature, .. } => *temperature = t,
    }
    s
}
