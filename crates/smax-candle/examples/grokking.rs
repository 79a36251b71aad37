//! Grokking at small scale (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"):
//! modular addition `(a + b) mod p` learned by an MLP with no weight decay, trained with softmax
//! cross-entropy and ⊥Grad (`smax::loss::orthogonal_gradient` on every parameter's gradient),
//! with plain softmax cross-entropy, and with StableMax cross-entropy, in f32, through
//! smax-candle's fused losses. Prints train and test accuracy and the Softmax-Collapse
//! fraction (training rows whose f32 softmax sum is exactly 1, so their loss and gradient are
//! exactly 0) every few epochs.
//!
//! The defaults are the paper's setup (one-hot inputs, an MLP `2p → 200 → 200 → p` without
//! biases, 40 % of the pairs for training, full batch, AdamW with lr 0.01, β₂ 0.999, ε 1e-25
//! and no weight decay): without weight decay nothing but the loss and the update rule
//! separates the three runs, which is the comparison the paper makes. What the runs give on
//! our machines: PERF.md, "The grokking example".
//!
//! ```text
//! cargo run --release -p smax-candle --example grokking -- [--runs orthograd,softmax,stablemax]
//!     [--p 113] [--epochs 1000] [--every 100]
//! ```

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use smax::loss::{CrossEntropyOptions, LossOptions, OrthoGradOptions};

struct Args {
    runs: Vec<String>,
    p: usize,
    epochs: usize,
    every: usize,
    train_fraction: f64,
}

fn args() -> Args {
    let mut a = Args {
        runs: vec!["orthograd".into(), "softmax".into(), "stablemax".into()],
        p: 113,
        epochs: 1000,
        every: 100,
        train_fraction: 0.4,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for w in v.chunks(2) {
        let val = w.get(1).map(String::as_str).unwrap_or("");
        match w[0].as_str() {
            "--p" => a.p = val.parse().expect("--p takes an integer"),
            "--epochs" => a.epochs = val.parse().expect("--epochs takes an integer"),
            "--every" => a.every = val.parse().expect("--every takes an integer"),
            "--train-fraction" => a.train_fraction = val.parse().expect("--train-fraction takes a number"),
            "--runs" => a.runs = val.split(',').map(str::to_string).collect(),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Every pair `(a, b)` as a one-hot `[2p]` row and its label, shuffled by a fixed seed, split.
fn data(p: usize, fraction: f64, dev: &Device) -> Result<[(Tensor, Tensor); 2]> {
    let mut pairs: Vec<(usize, usize)> = (0..p).flat_map(|a| (0..p).map(move |b| (a, b))).collect();
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..pairs.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        pairs.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let n_train = (pairs.len() as f64 * fraction).round() as usize;
    let build = |ps: &[(usize, usize)]| -> Result<(Tensor, Tensor)> {
        let mut x = vec![0.0f32; ps.len() * 2 * p];
        let y: Vec<u32> = ps.iter().map(|&(a, b)| ((a + b) % p) as u32).collect();
        for (r, &(a, b)) in ps.iter().enumerate() {
            x[r * 2 * p + a] = 1.0;
            x[r * 2 * p + p + b] = 1.0;
        }
        Ok((Tensor::from_vec(x, (ps.len(), 2 * p), dev)?, Tensor::from_vec(y, ps.len(), dev)?))
    };
    Ok([build(&pairs[..n_train])?, build(&pairs[n_train..])?])
}

struct Mlp {
    l1: candle_nn::Linear,
    l2: candle_nn::Linear,
    l3: candle_nn::Linear,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.l3.forward(&self.l2.forward(&self.l1.forward(x)?.relu()?)?.relu()?)
    }
}

fn accuracy(logits: &Tensor, y: &Tensor) -> Result<f64> {
    let hit = logits.argmax(D::Minus1)?.eq(y)?.to_dtype(DType::F64)?.mean_all()?;
    hit.to_scalar::<f64>()
}

fn collapse(logits: &Tensor) -> Result<f64> {
    let (n, c) = logits.dims2()?;
    let v = logits.flatten_all()?.to_vec1::<f32>()?;
    let view = smax::View::new(&v, smax::Layout::rows(n, c)).map_err(candle_core::Error::wrap)?;
    smax::loss::softmax_collapse_fraction(view).map_err(candle_core::Error::wrap)
}

fn run(loss_name: &str, a: &Args, [(xt, yt), (xv, yv)]: &[(Tensor, Tensor); 2]) -> Result<()> {
    let orthograd = loss_name.ends_with("⊥Grad");
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
    let h = 200;
    let mlp = Mlp {
        l1: candle_nn::linear_no_bias(2 * a.p, h, vb.pp("l1"))?,
        l2: candle_nn::linear_no_bias(h, h, vb.pp("l2"))?,
        l3: candle_nn::linear_no_bias(h, a.p, vb.pp("l3"))?,
    };
    let params = ParamsAdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-25, weight_decay: 0.0 };
    let mut opt = AdamW::new(map.all_vars(), params)?;
    println!("\n{loss_name} cross-entropy, f32, p = {}, {} train / {} test pairs", a.p, xt.dim(0)?, xv.dim(0)?);
    println!("{:>7} {:>12} {:>10} {:>10} {:>14}", "epoch", "train loss", "train acc", "test acc", "SC fraction");
    let start = std::time::Instant::now();
    for epoch in 1..=a.epochs {
        let logits = mlp.forward(xt)?;
        let loss = match loss_name {
            "StableMax" => smax_candle::stablemax_cross_entropy(&logits, yt, &LossOptions::default())?,
            _ => smax_candle::cross_entropy(&logits, yt, &CrossEntropyOptions::default())?,
        };
        let mut grads = loss.backward()?;
        if orthograd {
            // ⊥Grad: each parameter's gradient made orthogonal to it (norm kept).
            for var in map.all_vars() {
                if let Some(g) = grads.get(&var) {
                    let w = var.flatten_all()?.to_vec1::<f32>()?;
                    let mut gv = g.flatten_all()?.to_vec1::<f32>()?;
                    smax::loss::orthogonal_gradient(&w, &mut gv, &OrthoGradOptions::default())
                        .map_err(candle_core::Error::wrap)?;
                    let g = Tensor::from_vec(gv, g.shape(), &dev)?;
                    grads.insert(&var, g);
                }
            }
        }
        opt.step(&grads)?;
        if epoch % a.every == 0 || epoch == 1 {
            let test = mlp.forward(xv)?;
            println!(
                "{epoch:>7} {:>12.3e} {:>10.3} {:>10.3} {:>14.3}",
                loss.to_scalar::<f32>()?,
                accuracy(&logits, yt)?,
                accuracy(&test, yv)?,
                collapse(&logits)?
            );
        }
    }
    println!("({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> Result<()> {
    let a = args();
    let sets = data(a.p, a.train_fraction, &Device::Cpu)?;
    for key in &a.runs {
        let name = match key.to_ascii_lowercase().as_str() {
            "orthograd" => "softmax + ⊥Grad",
            "softmax" => "softmax",
            "stablemax" => "StableMax",
            other => panic!("unknown run {other}: orthograd, softmax or stablemax"),
        };
        run(name, &a, &sets)?;
    }
    Ok(())
}
