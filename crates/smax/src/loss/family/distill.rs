//! Distillation (L6, L11) and USKD (L6b).

use super::*;

// ---------------------------------------------------------------------------------------------
// Distillation (L6, L11).

/// NKD, normalised knowledge distillation (Yang et al. 2023; L6), with the teacher's gradient
/// stopped: `L = −T_t·ln S_t − γλ²·Σ_{k≠t} T̂_k ln Ŝ_k`, where `S`, `T` are the softmaxes of the
/// student and teacher logits and `Ŝ`, `T̂` the softmaxes of their non-target logits at
/// temperature λ (computed over the K−1 logits, never as `S_k/(1 − S_t)`). Gradient with respect
/// to the student: `T_t(S_k − [k = t]) + [k ≠ t]·γλ(Ŝ_k − T̂_k)`. λ and γ are tuned per
/// teacher/student pair and dataset ([`Nkd`]'s default is the authors' ImageNet setting; their
/// other settings are in the repository's PERF.md, "Settings from the papers"). The trainer adds the
/// ordinary cross-entropy separately. K = 1 has no non-target part; a teacher whose
/// non-target logits are all `-inf` has `L_nt = 0` for that row, which is flagged.
pub fn nkd_loss<T: Element>(
    student: View<'_, T>,
    teacher: View<'_, T>,
    targets: &[i64],
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    opts: &LossOptions<Nkd>,
) -> Result<LossReport> {
    let Nkd { temperature, gamma } = opts.params;
    let o = &opts.common();
    positive("temperature", temperature)?;
    param("gamma", gamma, gamma.is_finite(), "finite")?;
    let (_, _, ts) = rows_of(&teacher, "teacher")?;
    student.layout.check_same("teacher", &teacher.layout)?;
    let lam = temperature;
    drive_classes(student, "student", targets, grad, rows_out, o, |r, t, zs, g| {
        let zt: Vec<f64> = teacher.data[r * ts..r * ts + zs.len()].iter().map(|v| v.to_f64()).collect();
        let (ls, lt) = (lse_of(zs, 1.0, |_| true), lse_of(&zt, 1.0, |_| true));
        let tt = (zt[t] - lt).exp();
        let mut loss = -tt * (zs[t] - ls);
        let nt = |k: usize| k != t;
        let (lsh, lth) = (lse_of(zs, 1.0 / lam, nt), lse_of(&zt, 1.0 / lam, nt));
        let no_nt = zs.len() == 1 || lth == f64::NEG_INFINITY;
        if !no_nt {
            let s = fsum((0..zs.len()).filter(|&k| k != t).map(|k| {
                let th = (zt[k] / lam - lth).exp();
                if th == 0.0 { 0.0 } else { th * (zs[k] / lam - lsh) }
            }));
            loss -= gamma * lam * lam * s;
        }
        if let Some(g) = g {
            for k in 0..zs.len() {
                g[k] = tt * ((zs[k] - ls).exp() - (k == t) as u8 as f64);
                if k != t && !no_nt {
                    g[k] += gamma * lam * ((zs[k] / lam - lsh).exp() - (zt[k] / lam - lth).exp());
                }
            }
        }
        (loss, no_nt && zs.len() > 1)
    })
}

/// Hinton knowledge distillation (L11): `L = T²·KL(softmax(z^t/T) ‖ softmax(z^s/T))` per row,
/// with the teacher's gradient stopped; gradient with respect to the student logits
/// `T·(softmax(z^s/T) − softmax(z^t/T))`. Every row counts (no targets); the mean is PyTorch's
/// `batchmean`. Teacher classes of probability 0 contribute 0.
pub fn hinton_kd_loss<T: Element>(
    student: View<'_, T>,
    teacher: View<'_, T>,
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    opts: &LossOptions<HintonKd>,
) -> Result<LossReport> {
    let HintonKd { temperature } = opts.params;
    let o = &opts.common();
    positive("temperature", temperature)?;
    rows_of(&student, "student")?;
    let (_, _, ts) = rows_of(&teacher, "teacher")?;
    student.layout.check_same("teacher", &teacher.layout)?;
    let k = 1.0 / temperature;
    drive(
        student,
        grad,
        rows_out,
        o,
        |_| true,
        |r, zs, g| {
            let zt: Vec<f64> = teacher.data[r * ts..r * ts + zs.len()].iter().map(|v| v.to_f64()).collect();
            let (ls, lt) = (lse_of(zs, k, |_| true), lse_of(&zt, k, |_| true));
            let kl = fsum((0..zs.len()).map(|i| {
                let lpt = zt[i] * k - lt;
                let pt = lpt.exp();
                if pt == 0.0 { 0.0 } else { pt * (lpt - (zs[i] * k - ls)) }
            }));
            if let Some(g) = g {
                for i in 0..zs.len() {
                    g[i] = temperature * ((zs[i] * k - ls).exp() - (zt[i] * k - lt).exp());
                }
            }
            Some((temperature * temperature * kl, false))
        },
    )
}

// ---------------------------------------------------------------------------------------------
// USKD (L6b).

/// How USKD ranks the non-target classes for its Zipf labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UskdRanking {
    /// The paper's score `W_k/(1 − W_t) + S_k/(1 − S_t)` (probabilities).
    #[default]
    PaperProb,
    /// The released code's score, whose student term uses log-probabilities:
    /// `W_k/(1 − W_t) + ln S_k/(1 − ln S_t)` (a variable reassigned before the ranking).
    CodeLogProb,
}

defaults! {
    /// Options of [`uskd_loss`]. The weights are tuned per dataset; `Default` is the authors'
    /// ImageNet setting (α = 1, β = 0.1, μ = 0.005; the other settings are in the repository's
    /// PERF.md, "Settings from the papers").
    #[derive(Debug, Clone, Copy)]
    pub struct UskdOptions {
        /// Weight α of the soft target term.
        pub alpha: f64 = 1.0,
        /// Weight β of the Zipf non-target term.
        pub beta: f64 = 0.1,
        /// Weight μ of the weak-supervision term.
        pub mu: f64 = 0.005,
        /// The ranking score.
        pub ranking: UskdRanking = UskdRanking::PaperProb,
        /// Execution settings (USKD runs on the calling thread in scalar f64: neither field
        /// changes anything; kept for the one options shape).
        pub exec: Exec = Exec::default(),
    }
}

setters!(UskdOptions { alpha: f64, beta: f64, mu: f64, ranking: UskdRanking });

/// The parts of a USKD loss (each a batch mean, before its weight, except `total`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UskdReport {
    /// `α·target + β·non_target + weak`.
    pub total: f64,
    /// `L_t = −mean(p_t·ln S_t)`.
    pub target: f64,
    /// `L_nt = −mean(Σ_{k≠t} ẑ_k ln softmax(z_{¬t})_k)`.
    pub non_target: f64,
    /// `L_weak = μ·mean(CE(w, 0.9·onehot + 0.1/C))` (μ included).
    pub weak: f64,
}

/// USKD's Zipf labels for one row: the classes ranked by `ranking` (rank 0 the largest score,
/// ties to the lower index) get weight `1/(rank + 1)`; the target `t` is dropped and the rest
/// renormalised. `z` and `w` are the student and weak logits, `ls` the student's log-sum-exp
/// and `lnz` its log-sum-exp over the non-target classes.
///
/// `S_k/(1 − S_t)` is evaluated as `exp(z_k − lse_{j≠t} z_j)` (the same quantity, since
/// `1 − S_t = Σ_{j≠t} S_j`): `1 − S_t` formed by subtraction rounds to 0 once the target's
/// margin passes about 37, which made every score infinite and the ranking depend on the
/// class order. Likewise `W_k/(1 − W_t)`.
fn zipf_labels(z: &[f64], w: &[f64], t: usize, (ls, lnz): (f64, f64), ranking: UskdRanking) -> Vec<f64> {
    let c = z.len();
    let lnw = lse_of(w, 1.0, |j| j != t);
    let score: Vec<f64> = (0..c)
        .map(|k| {
            let a = (w[k] - lnw).exp();
            match ranking {
                UskdRanking::PaperProb => a + (z[k] - lnz).exp(),
                UskdRanking::CodeLogProb => a + (z[k] - ls) / (1.0 - (z[t] - ls)),
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&i, &j| score[j].partial_cmp(&score[i]).unwrap_or(core::cmp::Ordering::Equal).then(i.cmp(&j)));
    let mut zipf = vec![0.0f64; c];
    for (rank, &k) in order.iter().enumerate() {
        zipf[k] = 1.0 / (rank as f64 + 1.0);
    }
    zipf[t] = 0.0;
    let zs = fsum(zipf.iter().copied());
    zipf.iter_mut().for_each(|v| *v /= zs);
    zipf
}

/// USKD, teacher-free self-distillation (Yang et al. 2023, same paper as NKD; L6b), over a batch
/// of student logits `z` and weak-head logits `w` (both `[batch x classes]`) with hard labels:
///
/// 1. soft target `p_t = S_t² + 1 − mean_batch(S_t²)` (no gradient), `L_t = −mean(p_t ln S_t)`;
/// 2. weak supervision `L_weak = μ·mean(−Σ_k q_k ln softmax(w)_k)`, `q = 0.9·onehot + 0.1/C`;
/// 3. Zipf labels: classes ranked by [`UskdRanking`] (rank 0 the largest score, ties to the
///    lower index) get weight `1/(rank + 1)`; the target is dropped and the rest renormalised to
///    `ẑ`; `L_nt = −mean(Σ_{k≠t} ẑ_k ln softmax(z_{¬t})_k)`;
/// 4. `total = α L_t + β L_nt + L_weak` (the trainer adds the ordinary cross-entropy).
///
/// Gradients (labels, `p_t` and ranks carry none): `∂/∂z_k = (α p_t (S_k − [k = t]) +
/// β [k ≠ t](Ŝ_k − ẑ_k))/B` into `dstudent`, `∂/∂w_k = μ (W_k − q_k)/B` into `dweak`. Every row
/// counts (no ignore index); targets must be in `[0, C)`; `C ≥ 2`.
pub fn uskd_loss<T: Element>(
    student: View<'_, T>,
    weak: View<'_, T>,
    targets: &[i64],
    dstudent: Option<ViewMut<'_, T>>,
    dweak: Option<ViewMut<'_, T>>,
    p: &UskdOptions,
) -> Result<UskdReport> {
    for (n, v) in [("alpha", p.alpha), ("beta", p.beta), ("mu", p.mu)] {
        param(n, v, v.is_finite(), "finite")?;
    }
    let (b, c, ss) = rows_of(&student, "student")?;
    let (_, _, ws) = rows_of(&weak, "weak")?;
    student.layout.check_same("weak", &weak.layout)?;
    if c < 2 && b > 0 {
        return Err(Error::bad_parameter("classes", c, "at least 2 classes (USKD ranks the non-target classes)"));
    }
    check_targets(targets, b, c, None)?;
    let mut outs = [dstudent, dweak];
    let mut strides = [0usize; 2];
    for (i, (o, what)) in outs.iter().zip(["dstudent", "dweak"]).enumerate() {
        if let Some(g) = o {
            student.layout.check_same(what, &g.layout)?;
            strides[i] = g.row_geometry(what, "gradients take row layouts")?.2;
        }
    }
    if b == 0 {
        return Ok(UskdReport { total: 0.0, target: 0.0, non_target: 0.0, weak: 0.0 });
    }
    let row = |v: &View<'_, T>, s: usize, r: usize| -> Vec<f64> {
        v.data[r * s..r * s + c].iter().map(|x| x.to_f64()).collect()
    };
    let softmax = |x: &[f64]| -> Vec<f64> {
        let l = lse_of(x, 1.0, |_| true);
        x.iter().map(|v| (v - l).exp()).collect()
    };
    // Per row: student logits, weak logits, and their softmaxes.
    type Row = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);
    let rows: Vec<Row> = (0..b)
        .map(|r| {
            let (z, w) = (row(&student, ss, r), row(&weak, ws, r));
            let (s, wp) = (softmax(&z), softmax(&w));
            (z, w, s, wp)
        })
        .collect();
    let mean_st2 = fsum(rows.iter().zip(targets).map(|((_, _, s, _), &t)| s[t as usize].powi(2))) / b as f64;
    let (mut lt, mut lnt, mut lw) = (Vec::new(), Vec::new(), Vec::new());
    let bf = b as f64;
    for (r, (z, w, s, wp)) in rows.iter().enumerate() {
        let t = targets[r] as usize;
        let pt = s[t].powi(2) + 1.0 - mean_st2;
        let ls = lse_of(z, 1.0, |_| true);
        lt.push(-pt * (z[t] - ls));
        // Weak supervision.
        let lw_ = lse_of(w, 1.0, |_| true);
        let q = |k: usize| 0.9 * (k == t) as u8 as f64 + 0.1 / c as f64;
        lw.push(p.mu * fsum((0..c).map(|k| -q(k) * (w[k] - lw_))));
        let lsn = lse_of(z, 1.0, |k| k != t);
        let zipf = zipf_labels(z, w, t, (ls, lsn), p.ranking);
        lnt.push(-fsum((0..c).filter(|&k| k != t).map(|k| zipf[k] * (z[k] - lsn))));
        if let Some(g) = outs[0].as_mut() {
            let st = strides[0];
            for k in 0..c {
                let mut v = p.alpha * pt * (s[k] - (k == t) as u8 as f64);
                if k != t {
                    v += p.beta * ((z[k] - lsn).exp() - zipf[k]);
                }
                g.data[r * st + k] = T::from_f64(v / bf);
            }
        }
        if let Some(g) = outs[1].as_mut() {
            let st = strides[1];
            for k in 0..c {
                g.data[r * st + k] = T::from_f64(p.mu * (wp[k] - q(k)) / bf);
            }
        }
    }
    let (target, non_target, weak_l) = (fsum(lt) / bf, fsum(lnt) / bf, fsum(lw) / bf);
    Ok(UskdReport { total: p.alpha * target + p.beta * non_target + weak_l, target, non_target, weak: weak_l })
}
