//! A tiny classifier trained end to end with `smax_burn::cross_entropy`: an MLP on four
//! interleaved spirals in the plane, Adam, on burn's Flex CPU backend under autodiff. A tenth of
//! the training labels are marked ignored (`-100`), as padding would be: they never count in
//! the loss or its mean. Prints the training loss and the accuracy on held-out points.
//!
//! ```text
//! cargo run --release -p smax-burn --example classifier
//! ```

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData, activation};
use smax::loss::CrossEntropyOptions;

#[derive(Module, Debug)]
struct Mlp {
    l1: Linear,
    l2: Linear,
    l3: Linear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Mlp {
            l1: LinearConfig::new(2, 64).init(device),
            l2: LinearConfig::new(64, 64).init(device),
            l3: LinearConfig::new(64, 4).init(device),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = activation::relu(self.l1.forward(x));
        let h = activation::relu(self.l2.forward(h));
        self.l3.forward(h)
    }
}

/// `n` points of four spirals with a little noise, and their arm.
fn spirals(n: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f32 / (1u64 << 53) as f32
    };
    let (mut x, mut y) = (Vec::with_capacity(2 * n), Vec::with_capacity(n));
    for i in 0..n {
        let arm = i % 4;
        let r = u();
        let t = r * 3.0 + arm as f32 * std::f32::consts::FRAC_PI_2 + (u() - 0.5) * 0.3;
        x.push(r * t.cos());
        x.push(r * t.sin());
        y.push(arm as i64);
    }
    (x, y)
}

fn accuracy(logits: Tensor<2>, y: &[i64]) -> f64 {
    let pred: Vec<i64> = logits.argmax(1).into_data().convert::<i64>().try_to_vec::<i64>().unwrap_or_default();
    pred.iter().zip(y).filter(|(p, t)| p == t).count() as f64 / y.len() as f64
}

fn main() -> Result<(), smax::Error> {
    let device = Device::default().autodiff();
    let (n, n_test) = (2048, 1024);
    let (xs, mut ys) = spirals(n, 1);
    for (i, y) in ys.iter_mut().enumerate() {
        if i % 10 == 7 {
            *y = -100;
        }
    }
    let (xt, yt) = spirals(n_test, 2);
    let x = Tensor::<2>::from_data(TensorData::new(xs, [n, 2]), &device);
    let y = Tensor::<1, Int>::from_data(ys.as_slice(), &device);
    let x_test = Tensor::<2>::from_data(TensorData::new(xt, [n_test, 2]), &device);
    let mut model = Mlp::new(&device);
    let mut opt = AdamConfig::new().init();
    let opts = CrossEntropyOptions::default().label_smoothing(0.02);
    println!("{:>5} {:>10} {:>14}", "step", "loss", "test accuracy");
    for step in 1..=400 {
        let logits = model.forward(x.clone());
        let loss = smax_burn::cross_entropy(logits, y.clone(), &opts)?;
        if step % 50 == 0 || step == 1 {
            let acc = accuracy(model.forward(x_test.clone()), &yt);
            println!("{step:>5} {:>10.4} {acc:>14.3}", loss.clone().into_scalar::<f32>());
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(1e-2, model, grads);
    }
    Ok(())
}
