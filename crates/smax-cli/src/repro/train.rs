//! The shared trainer of the reproductions: a ReLU MLP (optional biases) with its backward
//! pass, Adam (optionally with decoupled weight decay), and seeded synthetic data (Gaussian
//! class clusters, modular addition). f32 parameters; products in safe Rust, rows in parallel.
//! The loss (and so the logit gradient) comes from smax: the caller turns the logits into
//! `dlogits` and calls `backward`.

use rayon::prelude::*;

use super::Rng;

/// `c[m×n] = a[m×k]·b[k×n]` (row-major), rows in parallel.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    c.par_chunks_mut(n).enumerate().for_each(|(i, ci)| {
        for p in 0..k {
            let x = a[i * k + p];
            if x != 0.0 {
                for (o, &w) in ci.iter_mut().zip(&b[p * n..(p + 1) * n]) {
                    *o += x * w;
                }
            }
        }
    });
    c
}

/// `aᵀ[k×m]·g[m×n]` for `a[m×k]`: the weight gradient, rows of the result in parallel.
fn matmul_tn(a: &[f32], g: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; k * n];
    c.par_chunks_mut(n).enumerate().for_each(|(p, cp)| {
        for i in 0..m {
            let x = a[i * k + p];
            if x != 0.0 {
                for (o, &v) in cp.iter_mut().zip(&g[i * n..(i + 1) * n]) {
                    *o += x * v;
                }
            }
        }
    });
    c
}

/// `g[m×n]·wᵀ` for `w[k×n]`: the input gradient.
fn matmul_nt(g: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * k];
    c.par_chunks_mut(k).enumerate().for_each(|(i, ci)| {
        let gi = &g[i * n..(i + 1) * n];
        for (p, o) in ci.iter_mut().enumerate() {
            *o = gi.iter().zip(&w[p * n..(p + 1) * n]).map(|(a, b)| a * b).sum();
        }
    });
    c
}

/// A ReLU MLP: `dims[0] → dims[1] → … → dims[L]`, ReLU between layers, logits last.
pub struct Mlp {
    pub dims: Vec<usize>,
    /// Layer `l`'s weights, `dims[l] × dims[l+1]` row-major.
    pub w: Vec<Vec<f32>>,
    /// Biases (empty vectors when the MLP has none).
    pub b: Vec<Vec<f32>>,
}

impl Mlp {
    /// PyTorch's `nn.Linear` initialisation: `U(−1/√fan_in, 1/√fan_in)`.
    pub fn new(dims: &[usize], bias: bool, rng: &mut Rng) -> Mlp {
        let mut w = Vec::new();
        let mut b = Vec::new();
        for l in 0..dims.len() - 1 {
            let s = 1.0 / (dims[l] as f64).sqrt();
            w.push((0..dims[l] * dims[l + 1]).map(|_| ((rng.uniform() * 2.0 - 1.0) * s) as f32).collect());
            b.push(if bias {
                (0..dims[l + 1]).map(|_| ((rng.uniform() * 2.0 - 1.0) * s) as f32).collect()
            } else {
                Vec::new()
            });
        }
        Mlp { dims: dims.to_vec(), w, b }
    }

    /// Activations of every layer for `n` inputs: `[x, h1, …, logits]`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<Vec<f32>> {
        let mut acts = vec![x.to_vec()];
        let last = self.w.len() - 1;
        for l in 0..self.w.len() {
            let (k, m) = (self.dims[l], self.dims[l + 1]);
            let mut h = matmul(&acts[l], &self.w[l], n, k, m);
            if !self.b[l].is_empty() {
                for r in h.chunks_mut(m) {
                    for (o, &b) in r.iter_mut().zip(&self.b[l]) {
                        *o += b;
                    }
                }
            }
            if l < last {
                for v in h.iter_mut() {
                    *v = v.max(0.0);
                }
            }
            acts.push(h);
        }
        acts
    }

    /// Gradients `(dW, db)` per layer from the activations and `∂loss/∂logits`.
    pub fn backward(&self, acts: &[Vec<f32>], dlogits: &[f32], n: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let layers = self.w.len();
        let (mut dw, mut db) = (vec![Vec::new(); layers], vec![Vec::new(); layers]);
        let mut g = dlogits.to_vec();
        for l in (0..layers).rev() {
            let (k, m) = (self.dims[l], self.dims[l + 1]);
            dw[l] = matmul_tn(&acts[l], &g, n, k, m);
            if !self.b[l].is_empty() {
                let mut s = vec![0.0f32; m];
                for r in g.chunks(m) {
                    for (o, &v) in s.iter_mut().zip(r) {
                        *o += v;
                    }
                }
                db[l] = s;
            }
            if l > 0 {
                let mut gi = matmul_nt(&g, &self.w[l], n, k, m);
                for (v, &a) in gi.iter_mut().zip(&acts[l]) {
                    if a <= 0.0 {
                        *v = 0.0;
                    }
                }
                g = gi;
            }
        }
        (dw, db)
    }

    /// Every parameter tensor, weights then biases (the order `Adam` keeps state in).
    pub fn params_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let (w, b) = (&mut self.w, &mut self.b);
        w.iter_mut().chain(b.iter_mut()).collect()
    }
}

/// Adam (Kingma & Ba) with optional decoupled weight decay (AdamW).
pub struct Adam {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    t: i32,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Adam {
    pub fn new(lr: f32) -> Adam {
        Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, t: 0, m: Vec::new(), v: Vec::new() }
    }

    /// One step over `params` with `grads` (same order and lengths).
    pub fn step(&mut self, params: Vec<&mut Vec<f32>>, grads: &[Vec<f32>]) {
        if self.m.is_empty() {
            self.m = grads.iter().map(|g| vec![0.0; g.len()]).collect();
            self.v = grads.iter().map(|g| vec![0.0; g.len()]).collect();
        }
        self.t += 1;
        let (c1, c2) = (1.0 - self.beta1.powi(self.t), 1.0 - self.beta2.powi(self.t));
        for (((p, g), m), v) in params.into_iter().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            for i in 0..g.len() {
                m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * g[i];
                v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * g[i] * g[i];
                let upd = (m[i] / c1) / ((v[i] / c2).sqrt() + self.eps);
                p[i] -= self.lr * (upd + self.weight_decay * p[i]);
            }
        }
    }
}

/// Gaussian class clusters: `classes` means drawn `N(0, spread²)` in `dim` dimensions, samples
/// `mean + N(0, 1)`. Returns `(x, labels, means)`.
pub fn clusters(
    rng: &mut Rng,
    n: usize,
    classes: usize,
    dim: usize,
    spread: f64,
    means: Option<&[f64]>,
) -> (Vec<f32>, Vec<i64>, Vec<f64>) {
    let mu: Vec<f64> = match means {
        Some(m) => m.to_vec(),
        None => (0..classes * dim).map(|_| rng.normal() * spread).collect(),
    };
    let mut x = Vec::with_capacity(n * dim);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let c = rng.below(classes);
        for j in 0..dim {
            x.push((mu[c * dim + j] + rng.normal()) as f32);
        }
        y.push(c as i64);
    }
    (x, y, mu)
}

/// Argmax accuracy of `logits` against `y`.
pub fn accuracy(logits: &[f32], y: &[i64], classes: usize) -> f64 {
    let ok = logits
        .chunks(classes)
        .zip(y)
        .filter(|(r, l)| {
            let am = (0..classes).fold(0, |a, i| if r[i] > r[a] { i } else { a });
            am as i64 == **l
        })
        .count();
    ok as f64 / y.len().max(1) as f64
}
