//! Reproductions about losses: Cut Cross-Entropy's memory, the decoupled softmax loss's floor,
//! comp-sum losses under label noise.

use smax::loss::{
    CompSum, CrossEntropyOptions, Decoupled, LossOptions, RowOutputs, Targets, comp_sum_loss, cross_entropy,
    decoupled_softmax_loss,
};
use smax::{View, ViewMut};

use super::train::{Adam, Mlp, accuracy, clusters};
use super::{Outcome, Preset, Rng, Table, median_time};
use crate::alloc::peak_extra;
use crate::bench_linear::{fused, materialized, max_rel};

fn e(x: smax::Error) -> String {
    x.to_string()
}

/// Claim 4 (Wijmans et al.): the linear cross-entropy's peak memory and time against the
/// materialized logits, with equal loss and gradients.
pub fn cce_memory(p: Preset, seed: u64) -> Result<Outcome, String> {
    let (n, d, v) = match p {
        Preset::Tiny => (256, 64, 2048),
        Preset::Quick => (2048, 512, 32000),
        Preset::Full => (4096, 512, 32000),
    };
    let reps = if p == Preset::Tiny { 1 } else { 3 };
    let mut rng = Rng(seed ^ 0xcce);
    let h: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let w: Vec<f32> = (0..v * d).map(|_| (rng.normal() * 0.05) as f32).collect();
    let y: Vec<i64> = (0..n).map(|_| rng.below(v) as i64).collect();
    let (mut dh1, mut dw1) = (vec![0.0f32; n * d], vec![0.0f32; v * d]);
    let (mut dh2, mut dw2) = (vec![0.0f32; n * d], vec![0.0f32; v * d]);
    let (l1, peak1) = peak_extra(|| materialized(&h, &w, &y, n, d, v, &mut dh1, &mut dw1));
    let (l2, peak2) = peak_extra(|| fused(&h, &w, &y, n, d, v, &mut dh2, &mut dw2));
    let t1 = median_time(reps, || {
        dh1.fill(0.0);
        dw1.fill(0.0);
        materialized(&h, &w, &y, n, d, v, &mut dh1, &mut dw1);
    });
    let t2 = median_time(reps, || {
        dh2.fill(0.0);
        dw2.fill(0.0);
        fused(&h, &w, &y, n, d, v, &mut dh2, &mut dw2);
    });
    let logits_mb = (n * v * 4) as f64 / 1e6;
    let mut t = Table::new(
        format!("loss + dh + dW at N = {n}, D = {d}, V = {v} (f32 logits alone: {logits_mb:.0} MB)"),
        &["path", "peak extra MB", "time (s)", "loss", "max rel diff dh", "max rel diff dW"],
    );
    t.row(vec![
        "materialized".into(),
        (peak1 as f64 / 1e6).into(),
        t1.into(),
        l1.into(),
        f64::NAN.into(),
        f64::NAN.into(),
    ]);
    t.row(vec![
        "smax linear_cross_entropy".into(),
        (peak2 as f64 / 1e6).into(),
        t2.into(),
        l2.into(),
        max_rel(&dh2, &dh1).into(),
        max_rel(&dw2, &dw1).into(),
    ]);
    Ok(Outcome {
        tables: vec![t],
        paper: "Gemma 2 (2B): loss memory 24 GB -> 1 MB, classifier-head training 28 GB -> 1 GB, no loss of speed; here N = 4096, V = 32000, D = 512 is 524 MB of logits against a few MB of tiles".into(),
        verdict: format!(
            "peak extra memory {:.1} MB against {:.0} MB ({:.0}x less), time {:.2}x the materialized path, loss equal to {:.1e} relative; the tile-skipping fraction of the 2^-12 filter during LM training is not measured here",
            peak2 as f64 / 1e6,
            peak1 as f64 / 1e6,
            peak1 as f64 / (peak2 as f64).max(1.0),
            t2 / t1,
            ((l2 - l1) / l1).abs()
        ),
    })
}

/// Multi-positive softmax loss (uniform soft target over the positives) with its gradient.
fn multi_positive(
    sims: &[f32],
    pos: &[bool],
    rows: usize,
    cols: usize,
    tau: f64,
    grad: Option<&mut [f32]>,
) -> Result<f64, String> {
    let logits: Vec<f32> = sims.iter().map(|&s| (s as f64 / tau) as f32).collect();
    let mut target = vec![0.0f32; rows * cols];
    for r in 0..rows {
        let m = pos[r * cols..(r + 1) * cols].iter().filter(|&&b| b).count().max(1) as f32;
        for j in 0..cols {
            if pos[r * cols + j] {
                target[r * cols + j] = 1.0 / m;
            }
        }
    }
    let o = CrossEntropyOptions::default().grad_scale(1.0 / tau);
    let g = grad.map(|g| ViewMut::rows(g, rows, cols)).transpose().map_err(e)?;
    let r = cross_entropy(
        View::rows(&logits, rows, cols).map_err(e)?,
        Targets::Probs(View::rows(&target, rows, cols).map_err(e)?),
        g,
        RowOutputs::default(),
        &o,
    )
    .map_err(e)?;
    Ok(r.loss)
}

fn decoupled(
    sims: &[f32],
    pos: &[bool],
    rows: usize,
    cols: usize,
    tau: f64,
    grad: Option<&mut [f32]>,
) -> Result<f64, String> {
    let g = grad.map(|g| ViewMut::rows(g, rows, cols)).transpose().map_err(e)?;
    let o = LossOptions::new(Decoupled { temperature: tau });
    Ok(decoupled_softmax_loss(View::rows(sims, rows, cols).map_err(e)?, pos, g, None, &o).map_err(e)?.loss)
}

/// Claim 9 (DEXML, Gupta et al.): with m positives the multi-positive softmax loss cannot go
/// below `ln m`, the decoupled loss goes to 0; and P@1 of a linear scorer trained with each.
pub fn decoupled_floor(p: Preset, seed: u64) -> Result<Outcome, String> {
    // (a) The floor: positives at cosine 1, negatives at 0, τ = 0.05 (a gap of 20).
    let cols = 64;
    let mut a = Table::new(
        "perfect separation (positives cos 1, negatives cos 0, tau 0.05): loss",
        &["m positives", "ln m", "multi-positive softmax", "decoupled"],
    );
    for m in [1usize, 2, 4, 8] {
        let sims: Vec<f32> = (0..cols).map(|j| if j < m { 1.0 } else { 0.0 }).collect();
        let pos: Vec<bool> = (0..cols).map(|j| j < m).collect();
        a.row(vec![
            m.into(),
            (m as f64).ln().into(),
            multi_positive(&sims, &pos, 1, cols, 0.05, None)?.into(),
            decoupled(&sims, &pos, 1, cols, 0.05, None)?.into(),
        ]);
    }
    // (b) A synthetic multi-label task: L labels with prototypes; a document mixes 2–5 of them
    // plus noise; a linear scorer (the label embeddings) trained with each loss; P@1 on held-out
    // documents.
    let (labels, dim, train_n, test_n, steps) = match p {
        Preset::Tiny => (32, 16, 256, 128, 30),
        Preset::Quick => (256, 64, 4096, 2048, 300),
        Preset::Full => (1024, 128, 16384, 4096, 600),
    };
    let mut rng = Rng(seed ^ 0xdec);
    let protos: Vec<f64> = (0..labels * dim).map(|_| rng.normal()).collect();
    let docs = |n: usize, rng: &mut Rng| -> (Vec<f32>, Vec<bool>) {
        let (mut x, mut pos) = (vec![0.0f32; n * dim], vec![false; n * labels]);
        for i in 0..n {
            let m = 2 + rng.below(4);
            for _ in 0..m {
                let l = rng.below(labels);
                pos[i * labels + l] = true;
                for j in 0..dim {
                    x[i * dim + j] += protos[l * dim + j] as f32;
                }
            }
            for j in 0..dim {
                x[i * dim + j] += (2.0 * rng.normal()) as f32;
            }
        }
        (x, pos)
    };
    let (xtr, ptr) = docs(train_n, &mut rng);
    let (xte, pte) = docs(test_n, &mut rng);
    let mut b = Table::new(
        format!(
            "{labels} labels, {dim}-dim documents with 2-5 positives, {steps} full-batch Adam steps: precision at 1 on {test_n} held-out documents"
        ),
        &["loss", "final train loss", "P@1"],
    );
    let mut p1 = Vec::new();
    for (name, dec) in [("multi-positive softmax", false), ("decoupled", true)] {
        let mut r = Rng(seed ^ 0x5eed);
        let mut mlp = Mlp::new(&[dim, labels], false, &mut r);
        let mut opt = Adam::new(0.01);
        let mut last = f64::NAN;
        for _ in 0..steps {
            let acts = mlp.forward(&xtr, train_n);
            let mut g = vec![0.0f32; train_n * labels];
            last = if dec {
                decoupled(&acts[1], &ptr, train_n, labels, 1.0, Some(&mut g))?
            } else {
                multi_positive(&acts[1], &ptr, train_n, labels, 1.0, Some(&mut g))?
            };
            let (dw, _) = mlp.backward(&acts, &g, train_n);
            opt.step(mlp.params_mut().into_iter().take(1).collect(), &dw);
        }
        let z = mlp.forward(&xte, test_n).pop().unwrap_or_default();
        let hits = z
            .chunks(labels)
            .enumerate()
            .filter(|(i, r)| {
                let am = (0..labels).fold(0, |a, j| if r[j] > r[a] { j } else { a });
                pte[i * labels + am]
            })
            .count();
        let prec = hits as f64 / test_n as f64;
        p1.push(prec);
        b.row(vec![name.into(), last.into(), prec.into()]);
    }
    Ok(Outcome {
        tables: vec![a, b],
        paper: "multi-positive softmax cannot go below log m (0.693 for m = 2) while decoupled softmax -> 0; DEXML matches or beats SOTA by up to 2 % P@1".into(),
        verdict: format!(
            "(a) reproduced exactly: the softmax loss sits at ln m, the decoupled loss at ~0; (b) P@1 {:.3} (decoupled) against {:.3} (softmax) on the synthetic task",
            p1[1], p1[0]
        ),
    })
}

/// Claim 14 (Mao, Mohri & Zhong, comp-sum losses): CE, GCE (q = 0.7) and MAE on Gaussian
/// clusters with 40 % symmetric label noise (and clean), an MLP per loss.
pub fn label_noise(p: Preset, seed: u64) -> Result<Outcome, String> {
    let (classes, dim, n_train, n_test, epochs, hidden) = match p {
        Preset::Tiny => (4, 8, 512, 256, 40, 32),
        Preset::Quick => (10, 32, 2048, 4096, 300, 64),
        Preset::Full => (10, 32, 16384, 8192, 1000, 256),
    };
    let mut rng = Rng(seed ^ 0x4015e);
    let (xtr, ytr, mu) = clusters(&mut rng, n_train, classes, dim, 0.45, None);
    let (xte, yte, _) = clusters(&mut rng, n_test, classes, dim, 0.45, Some(&mu));
    let mut t = Table::new(
        format!(
            "{classes} Gaussian classes in {dim} dims, MLP {dim}-{hidden}-{hidden}-{classes}, {epochs} full-batch Adam epochs: clean test accuracy"
        ),
        &["noise", "CE (tau 1)", "GCE q=0.7 (tau 1.7)", "MAE (tau 2)"],
    );
    let mut res = Vec::new();
    for noise in [0.0, 0.4] {
        let mut nr = Rng(seed ^ 0x7);
        let ynoisy: Vec<i64> =
            ytr.iter().map(|&l| if nr.uniform() < noise { nr.below(classes) as i64 } else { l }).collect();
        let mut row = vec![format!("{:.0} %", noise * 100.0).into()];
        for tau in [1.0, 1.7, 2.0] {
            let mut r = Rng(seed ^ 0x11);
            let mut mlp = Mlp::new(&[dim, hidden, hidden, classes], true, &mut r);
            let mut opt = Adam::new(0.003);
            for _ in 0..epochs {
                let acts = mlp.forward(&xtr, n_train);
                let mut g = vec![0.0f32; n_train * classes];
                comp_sum_loss(
                    View::rows(&acts[acts.len() - 1], n_train, classes).map_err(e)?,
                    &ynoisy,
                    Some(ViewMut::rows(&mut g, n_train, classes).map_err(e)?),
                    None,
                    &LossOptions::new(CompSum { tau }),
                )
                .map_err(e)?;
                let (dw, db) = mlp.backward(&acts, &g, n_train);
                let grads: Vec<Vec<f32>> = dw.into_iter().chain(db).collect();
                opt.step(mlp.params_mut(), &grads);
            }
            let z = mlp.forward(&xte, n_test).pop().unwrap_or_default();
            let acc = accuracy(&z, &yte, classes);
            res.push((noise, tau, acc));
            row.push(acc.into());
        }
        t.row(row);
    }
    let get = |n: f64, tau: f64| res.iter().find(|r| r.0 == n && r.1 == tau).map_or(f64::NAN, |r| r.2);
    Ok(Outcome {
        tables: vec![t],
        paper: "bounded losses (MAE, GCE) are robust to symmetric label noise where CE overfits it; MAE underfits clean labels (theory; no table recovered)".into(),
        verdict: format!(
            "at 40 % noise: CE {:.3}, GCE {:.3}, MAE {:.3}; clean: CE {:.3}, GCE {:.3}, MAE {:.3} (test accuracy on clean labels)",
            get(0.4, 1.0),
            get(0.4, 1.7),
            get(0.4, 2.0),
            get(0.0, 1.0),
            get(0.0, 1.7),
            get(0.0, 2.0)
        ),
    })
}
