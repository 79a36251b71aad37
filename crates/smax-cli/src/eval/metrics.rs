//! One pass over the logits (and labels) at a temperature: accuracy, NLL, Brier, calibration
//! bins and OOD scores, accumulated chunk by chunk. Per chunk, smax's `logsumexp` (f32 SIMD)
//! gives `lse(z/T)` and `lse(2z/T)`; one scalar pass per row gives the max, the argmax and
//! the rank of the label. Partial sums are f64, merged in row order (deterministic).

use rayon::prelude::*;
use smax::calibrate::equal_width_bin;
use smax::{Options, View};

use super::arrays::Array;

/// The logits (rows × classes: every axis but the last is a row axis) and the labels.
pub struct Data {
    pub logits: Array,
    pub labels: Option<Array>,
    pub rows: usize,
    pub classes: usize,
    pub ignore_index: i64,
    /// Rows per chunk.
    pub chunk: usize,
    /// Print the share of rows read to stderr after each chunk (large files on a terminal).
    pub progress: bool,
}

/// Rows per chunk for `classes` columns: about 32 MiB of f32 per chunk.
pub fn chunk_rows(classes: usize) -> usize {
    ((32usize << 20) / 4 / classes.max(1)).max(1)
}

impl Data {
    pub fn new(logits: Array, labels: Option<Array>, ignore_index: i64) -> Result<Data, String> {
        if !logits.is_float() {
            return Err(format!("{}: logits must be floating point, not {}", logits.name, logits.dtype.name()));
        }
        let (&classes, lead) =
            logits.shape.split_last().filter(|(_, l)| !l.is_empty()).ok_or_else(|| {
                format!("{}: logits must be [N, C] or [N, T, V], got {:?}", logits.name, logits.shape)
            })?;
        if classes == 0 {
            return Err(format!("{}: zero classes", logits.name));
        }
        let rows = lead.iter().product::<usize>();
        if let Some(l) = &labels {
            if l.is_float() {
                return Err(format!("{}: labels must be integers, not {}", l.name, l.dtype.name()));
            }
            if l.shape != lead && !(l.shape.len() == 1 && l.shape[0] == rows) {
                return Err(format!(
                    "{}: labels of shape {:?} do not match logits {:?} (expected {:?})",
                    l.name, l.shape, logits.shape, lead
                ));
            }
        }
        Ok(Data { logits, labels, rows, classes, ignore_index, chunk: chunk_rows(classes), progress: false })
    }

    /// The position of row `r` in the logits' leading axes, for messages (`[n, t]`).
    pub fn position(&self, r: usize) -> String {
        let lead = &self.logits.shape[..self.logits.shape.len() - 1];
        let mut idx = vec![0; lead.len()];
        let mut x = r;
        for (i, &d) in lead.iter().enumerate().rev() {
            idx[i] = x % d.max(1);
            x /= d.max(1);
        }
        format!("{idx:?}")
    }

    /// Calls `f(first_row, logits_chunk, labels_chunk)` over the rows in order.
    pub fn for_each_chunk(
        &self,
        mut f: impl FnMut(usize, &[f32], Option<&[i64]>) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut lr = self.logits.reader()?;
        let mut yr = self.labels.as_ref().map(|l| l.reader().map(|r| (r, l.dtype))).transpose()?;
        let (mut z, mut y) = (Vec::new(), Vec::new());
        let mut r0 = 0;
        while r0 < self.rows {
            let nr = self.chunk.min(self.rows - r0);
            lr.read_f32(self.logits.dtype, nr * self.classes, &mut z)?;
            if let Some((r, dt)) = yr.as_mut() {
                r.read_i64(*dt, nr, &mut y)?;
            }
            f(r0, &z, yr.as_ref().map(|_| &y[..]))?;
            r0 += nr;
            if self.progress {
                eprint!("\r{:5.1} %", 100.0 * r0 as f64 / self.rows as f64);
            }
        }
        Ok(())
    }
}

/// What a pass keeps besides the sums.
#[derive(Clone, Copy)]
pub struct PassSpec {
    pub temperature: f64,
    pub bins: usize,
    pub topk: usize,
    /// Keep each row's (confidence, correct) for equal-mass bins.
    pub keep_confidences: bool,
    /// Keep each row's OOD scores (MSP, max-logit, negative energy).
    pub keep_scores: bool,
}

/// One equal-width bin's sums.
#[derive(Clone, Copy, Default, Debug)]
pub struct BinSum {
    pub count: u64,
    pub correct: u64,
    pub confidence: f64,
}

/// The sums of one pass.
#[derive(Default, Debug)]
pub struct Summary {
    /// Rows evaluated (finite logits, label not ignored).
    pub n: u64,
    pub ignored: u64,
    pub nonfinite: u64,
    pub first_nonfinite: Option<usize>,
    pub correct1: u64,
    pub correctk: u64,
    pub nll: f64,
    pub brier: f64,
    pub confidence: f64,
    pub bins: Vec<BinSum>,
    /// (confidence, correct) per evaluated row, in row order (equal-mass binning only).
    pub confidences: Vec<(f64, bool)>,
    /// (MSP, max-logit, negative energy) per evaluated row, in row order (OOD only).
    pub scores: Vec<[f64; 3]>,
}

impl Summary {
    fn merge(&mut self, o: Summary) {
        self.n += o.n;
        self.ignored += o.ignored;
        if self.first_nonfinite.is_none() {
            self.first_nonfinite = o.first_nonfinite;
        }
        self.nonfinite += o.nonfinite;
        self.correct1 += o.correct1;
        self.correctk += o.correctk;
        self.nll += o.nll;
        self.brier += o.brier;
        self.confidence += o.confidence;
        if self.bins.len() < o.bins.len() {
            self.bins.resize(o.bins.len(), BinSum::default());
        }
        for (a, b) in self.bins.iter_mut().zip(o.bins) {
            a.count += b.count;
            a.correct += b.correct;
            a.confidence += b.confidence;
        }
        self.confidences.extend(o.confidences);
        self.scores.extend(o.scores);
    }
}

fn lse_rows(z: &[f32], rows: usize, cols: usize, t: f64) -> Result<Vec<f32>, String> {
    let v = View::rows(z, rows, cols).map_err(|e| e.to_string())?;
    smax::logsumexp_to_vec(v, &Options { temperature: t, ..Default::default() }).map_err(|e| e.to_string())
}

/// The row's maximum and whether every entry is finite, in 16 independent lanes (the loop
/// compiles to vector max and multiply-add; `v·0` is NaN exactly for infinite or NaN `v`).
fn max_and_finite(row: &[f32]) -> (f32, bool) {
    const L: usize = 16;
    let (mut m, mut z) = ([f32::NEG_INFINITY; L], [0.0f32; L]);
    let mut it = row.chunks_exact(L);
    for c in &mut it {
        for i in 0..L {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
            z[i] += c[i] * 0.0;
        }
    }
    let (mut mx, mut zero) =
        (m.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a }), z.iter().sum::<f32>());
    for &v in it.remainder() {
        mx = if v > mx { v } else { mx };
        zero += v * 0.0;
    }
    (mx, zero == 0.0)
}

/// How many entries of `row` exceed `x` (16 lanes of counters, vectorised).
fn count_above(row: &[f32], x: f32) -> usize {
    const L: usize = 16;
    let mut k = [0u64; L];
    let mut it = row.chunks_exact(L);
    for c in &mut it {
        for i in 0..L {
            k[i] += (c[i] > x) as u64;
        }
    }
    k.iter().map(|&v| v as usize).sum::<usize>() + it.remainder().iter().filter(|&&v| v > x).count()
}

/// Whether `c` lies within 1e-6 of an edge `k/m` of `m` equal-width bins.
fn near_edge(c: f64, m: usize) -> bool {
    let x = c * m as f64;
    (x - x.round()).abs() < 1e-6 * m as f64
}

/// Rows per parallel task inside a chunk.
const BLOCK: usize = 64;

/// One pass at `spec.temperature`. Errors: a label outside `[0, classes)` that is not the
/// ignore index (naming the row), and read errors.
pub fn pass(d: &Data, spec: &PassSpec) -> Result<Summary, String> {
    let (c, t) = (d.classes, spec.temperature);
    let b = 1.0 / t;
    let mut total = Summary { bins: vec![BinSum::default(); spec.bins], ..Default::default() };
    d.for_each_chunk(|r0, z, y| {
        let nr = z.len() / c;
        let lse1 = lse_rows(z, nr, c, t)?;
        let lse2 = if y.is_some() { lse_rows(z, nr, c, t / 2.0)? } else { Vec::new() };
        let parts: Vec<Result<Summary, String>> = (0..nr.div_ceil(BLOCK))
            .into_par_iter()
            .map(|blk| {
                let mut s = Summary { bins: vec![BinSum::default(); spec.bins], ..Default::default() };
                for r in blk * BLOCK..((blk + 1) * BLOCK).min(nr) {
                    let row = &z[r * c..(r + 1) * c];
                    let label = y.map(|y| y[r]);
                    if label == Some(d.ignore_index) {
                        s.ignored += 1;
                        continue;
                    }
                    if let Some(l) = label
                        && !usize::try_from(l).is_ok_and(|l| l < c)
                    {
                        return Err(format!(
                            "label {l} of row {} (position {} of the logits) is outside [0, {c}) and is not the ignore index {}",
                            r0 + r,
                            d.position(r0 + r),
                            d.ignore_index
                        ));
                    }
                    let (mx, finite) = max_and_finite(row);
                    let lse = lse1[r] as f64;
                    if !finite || !lse.is_finite() {
                        s.nonfinite += 1;
                        s.first_nonfinite.get_or_insert(r0 + r);
                        continue;
                    }
                    s.n += 1;
                    let mut conf = ((mx as f64) * b - lse).exp().min(1.0);
                    if spec.bins > 0 && near_edge(conf, spec.bins) {
                        // The f32 lse puts `conf` within ~1e-7 of its value: recompute it in
                        // f64 so that ties (equal logits give exactly 1/2, 1/3, ...) land in
                        // the bin their exact value closes.
                        let m64 = mx as f64 * b;
                        conf = 1.0 / row.iter().map(|&v| (v as f64 * b - m64).exp()).sum::<f64>();
                    }
                    s.confidence += conf;
                    if spec.keep_scores {
                        s.scores.push([conf, mx as f64, t * lse]);
                    }
                    let Some(l) = label else { continue };
                    let l = l as usize;
                    let zy = row[l];
                    // Rank of the label under "larger logit first, lower index first on ties"
                    // (the argmax's rule); correct when nothing ranks above it.
                    let rank = count_above(row, zy) + row[..l].iter().filter(|&&v| v == zy).count();
                    let correct = rank == 0;
                    s.correct1 += correct as u64;
                    s.correctk += (rank < spec.topk) as u64;
                    s.nll += lse - zy as f64 * b;
                    let py = (zy as f64 * b - lse).exp();
                    s.brier += ((lse2[r] as f64 - 2.0 * lse).exp() - 2.0 * py + 1.0).max(0.0);
                    if spec.bins > 0 {
                        let bin = &mut s.bins[equal_width_bin(conf, spec.bins)];
                        bin.count += 1;
                        bin.correct += correct as u64;
                        bin.confidence += conf;
                    }
                    if spec.keep_confidences {
                        s.confidences.push((conf, correct));
                    }
                }
                Ok(s)
            })
            .collect();
        for p in parts {
            total.merge(p?);
        }
        Ok(())
    })?;
    Ok(total)
}

/// The mean `(NLL, dNLL/dβ, d²NLL/dβ²)` of temperature scaling at `β` over the labelled,
/// finite rows: per chunk, smax's `softmax` and `logsumexp` at `T = 1/β` (f32 SIMD), then per
/// row `E[z − m]` and `E[(z − m)²]` under those probabilities accumulated in f64, so that
/// `dNLL/dβ = E[z] − z_y` and `d²NLL/dβ² = Var[z]` are formed from shifted, well-scaled terms.
/// The f32 probabilities leave ~1e-7 relative noise: the fit runs with a tolerance of 1e-7.
pub fn nll_moments(d: &Data, beta: f64) -> Result<(f64, f64, f64), String> {
    let c = d.classes;
    let t = 1.0 / beta;
    let (mut acc, mut n) = ([0.0f64; 3], 0u64);
    let mut p = Vec::new();
    d.for_each_chunk(|_, z, y| {
        let y = y.ok_or("temperature fitting needs labels")?;
        let nr = z.len() / c;
        let opts = Options { temperature: t, ..Default::default() };
        let v = View::rows(z, nr, c).map_err(|e| e.to_string())?;
        p.resize(z.len(), 0.0f32);
        smax::softmax(v, smax::ViewMut::rows(&mut p, nr, c).map_err(|e| e.to_string())?, &opts)
            .map_err(|e| e.to_string())?;
        let lse = lse_rows(z, nr, c, t)?;
        let p = &p;
        let parts: Vec<([f64; 3], u64)> = (0..nr.div_ceil(BLOCK))
            .into_par_iter()
            .map(|blk| {
                let (mut a, mut k) = ([0.0f64; 3], 0u64);
                for r in blk * BLOCK..((blk + 1) * BLOCK).min(nr) {
                    let (row, pr) = (&z[r * c..(r + 1) * c], &p[r * c..(r + 1) * c]);
                    let l = y[r];
                    // Labels were range-checked by the pass before the fit.
                    let Some(l) = usize::try_from(l).ok().filter(|&l| l < c && y[r] != d.ignore_index) else {
                        continue;
                    };
                    let (m, finite) = max_and_finite(row);
                    if !finite || !lse[r].is_finite() {
                        continue;
                    }
                    let (e1, e2) = shifted_moments(pr, row, m);
                    let dy = row[l] as f64 - m as f64;
                    a[0] += lse[r] as f64 - beta * row[l] as f64;
                    a[1] += e1 - dy;
                    a[2] += (e2 - e1 * e1).max(0.0);
                    k += 1;
                }
                (a, k)
            })
            .collect();
        for (a, k) in parts {
            for (x, v) in acc.iter_mut().zip(a) {
                *x += v;
            }
            n += k;
        }
        Ok(())
    })?;
    if n == 0 {
        return Err("no labelled rows to fit a temperature on".into());
    }
    let nf = n as f64;
    Ok((acc[0] / nf, acc[1] / nf, acc[2] / nf))
}

/// `(Σ p·(z − m), Σ p·(z − m)²)` in f64 over 8 independent lanes.
fn shifted_moments(p: &[f32], z: &[f32], m: f32) -> (f64, f64) {
    const L: usize = 8;
    let (mut a, mut b) = ([0.0f64; L], [0.0f64; L]);
    let m = m as f64;
    let (pc, zc) = (p.chunks_exact(L), z.chunks_exact(L));
    let (pr, zr) = (pc.remainder(), zc.remainder());
    for (pc, zc) in pc.zip(zc) {
        for i in 0..L {
            let d = zc[i] as f64 - m;
            let q = pc[i] as f64 * d;
            a[i] += q;
            b[i] += q * d;
        }
    }
    let (mut s1, mut s2) = (a.iter().sum::<f64>(), b.iter().sum::<f64>());
    for (&q, &v) in pr.iter().zip(zr) {
        let d = v as f64 - m;
        s1 += q as f64 * d;
        s2 += q as f64 * d * d;
    }
    (s1, s2)
}

/// Area under the ROC curve of `pos` against `neg` (higher score = positive): the
/// Mann–Whitney statistic with ties counted one half. NaN when either set is empty.
pub fn auroc(pos: &[f64], neg: &[f64]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut all: Vec<(f64, bool)> = pos.iter().map(|&s| (s, true)).chain(neg.iter().map(|&s| (s, false))).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of the positives' mid-ranks (1-based).
    let (mut rank_sum, mut i) = (0.0f64, 0);
    while i < all.len() {
        let mut j = i;
        while j < all.len() && all[j].0 == all[i].0 {
            j += 1;
        }
        let mid = (i + 1 + j) as f64 / 2.0;
        rank_sum += mid * all[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let (np, nn) = (pos.len() as f64, neg.len() as f64);
    (rank_sum - np * (np + 1.0) / 2.0) / (np * nn)
}

/// False-positive rate at 95 % true-positive rate: the threshold is the largest score that keeps
/// at least 95 % of `pos` (`score ≥ θ`), and the result is the fraction of `neg` at or above it.
pub fn fpr_at_95(pos: &[f64], neg: &[f64]) -> f64 {
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut p = pos.to_vec();
    p.sort_by(|a, b| b.total_cmp(a));
    let k = ((0.95 * p.len() as f64).ceil() as usize).clamp(1, p.len());
    let theta = p[k - 1];
    neg.iter().filter(|&&s| s >= theta).count() as f64 / neg.len() as f64
}
