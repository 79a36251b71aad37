//! `smax eval`: how good and how calibrated a model's logits are, and how well their scores
//! separate out-of-distribution inputs. Reads `.npy`, `.npz` and safetensors (f32, f16, bf16,
//! f64), `[N, C]` or token-level `[N, T, V]` with an ignore index, in chunks of ~32 MiB, so
//! memory is one chunk plus 16 bytes per row where equal-mass bins or `--ood` need every
//! row's confidence or scores.

mod arrays;
pub mod metrics;
mod plot;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args as ClapArgs, ValueEnum};

use arrays::Array;
use metrics::{Data, PassSpec, Summary};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum Binning {
    /// M bins of equal width, closed on the right: (k/M, (k+1)/M].
    Width,
    /// M bins of equal count over the sorted confidences.
    Mass,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Logits: .npy, .npz or .safetensors; [N, C] or [N, T, V]; f32, f16, bf16 or f64.
    pub logits: PathBuf,
    /// Labels file (.npy, .npz or .safetensors, integers of shape [N] or [N, T]).
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Labels stored in the logits file under this key (.npz / safetensors), or the key in the
    /// --labels file.
    #[arg(long)]
    pub labels_key: Option<String>,
    /// The logits' key in an .npz / safetensors file holding several arrays.
    #[arg(long)]
    pub key: Option<String>,
    /// Label marking a row (token) to skip.
    #[arg(long, default_value_t = -100, allow_negative_numbers = true)]
    pub ignore_index: i64,
    /// Evaluate at this temperature (logits divided by T).
    #[arg(long, conflicts_with = "fit_temperature")]
    pub temperature: Option<f64>,
    /// Fit the temperature minimising the NLL (Guo et al. 2017) and report the metrics after it.
    #[arg(long)]
    pub fit_temperature: bool,
    /// Calibration bins.
    #[arg(long, default_value_t = 15)]
    pub bins: usize,
    /// How the calibration bins are formed.
    #[arg(long, value_enum, default_value_t = Binning::Width)]
    pub binning: Binning,
    /// k of the top-k accuracy.
    #[arg(long, default_value_t = 5)]
    pub topk: usize,
    /// Out-of-distribution logits (same format and key): AUROC and FPR@95 of MSP, max-logit
    /// and energy, the in-distribution file counted as positive.
    #[arg(long)]
    pub ood: Option<PathBuf>,
    /// Reliability diagram (before and, with a fitted temperature, after) as .svg or .png.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write every figure as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Rows per chunk (default: about 32 MiB of f32 per chunk).
    #[arg(long, hide = true)]
    pub chunk_rows: Option<usize>,
}

/// One reliability-diagram bin as reported.
pub struct BinRow {
    pub lo: f64,
    pub hi: f64,
    pub count: u64,
    pub accuracy: f64,
    pub confidence: f64,
}

/// The figures of one temperature.
pub struct Report {
    pub temperature: f64,
    pub n: u64,
    pub top1: f64,
    pub topk: f64,
    pub nll: f64,
    pub brier: f64,
    pub mean_confidence: f64,
    pub ece: f64,
    pub mce: f64,
    pub bins: Vec<BinRow>,
}

fn bins_of(s: &Summary, a: &Args) -> Vec<BinRow> {
    let m = a.bins;
    match a.binning {
        Binning::Width => s
            .bins
            .iter()
            .enumerate()
            .map(|(k, b)| BinRow {
                lo: k as f64 / m as f64,
                hi: (k + 1) as f64 / m as f64,
                count: b.count,
                accuracy: if b.count > 0 { b.correct as f64 / b.count as f64 } else { f64::NAN },
                confidence: if b.count > 0 { b.confidence / b.count as f64 } else { f64::NAN },
            })
            .collect(),
        Binning::Mass => {
            let mut c = s.confidences.clone();
            c.sort_by(|x, y| x.0.total_cmp(&y.0));
            let n = c.len();
            let at = |k: usize| (k as u128 * n as u128 / m as u128) as usize;
            (0..m)
                .filter(|&k| at(k + 1) > at(k))
                .map(|k| {
                    let part = &c[at(k)..at(k + 1)];
                    let cnt = part.len() as f64;
                    BinRow {
                        lo: part[0].0,
                        hi: part[part.len() - 1].0,
                        count: part.len() as u64,
                        accuracy: part.iter().filter(|x| x.1).count() as f64 / cnt,
                        confidence: part.iter().map(|x| x.0).sum::<f64>() / cnt,
                    }
                })
                .collect()
        }
    }
}

fn report(s: &Summary, t: f64, a: &Args) -> Report {
    let n = s.n as f64;
    let bins = bins_of(s, a);
    let (mut ece, mut mce) = (0.0, 0.0f64);
    for b in bins.iter().filter(|b| b.count > 0) {
        let gap = (b.accuracy - b.confidence).abs();
        ece += b.count as f64 / n * gap;
        mce = mce.max(gap);
    }
    Report {
        temperature: t,
        n: s.n,
        top1: s.correct1 as f64 / n,
        topk: s.correctk as f64 / n,
        nll: s.nll / n,
        brier: s.brier / n,
        mean_confidence: s.confidence / n,
        ece,
        mce,
        bins,
    }
}

/// The temperature fit's figures.
pub struct Fit {
    pub temperature: f64,
    pub passes: usize,
    pub converged: bool,
    pub capped: bool,
}

/// OOD figures per score: (name, AUROC, FPR@95).
type Ood = Vec<(&'static str, f64, f64)>;

fn with_chunk(mut d: Data, a: &Args) -> Result<Data, String> {
    d.progress = wants_progress(&d);
    match a.chunk_rows {
        Some(0) => Err("--chunk-rows must be at least 1".into()),
        Some(c) => {
            d.chunk = c;
            Ok(d)
        }
        None => Ok(d),
    }
}

fn open_pair(a: &Args) -> Result<Data, String> {
    let logits = Array::open(&a.logits, a.key.as_deref())?;
    let labels = match (&a.labels, &a.labels_key) {
        (Some(p), k) => Some(Array::open(p, k.as_deref())?),
        (None, Some(k)) => Some(Array::open(&a.logits, Some(k))?),
        (None, None) => None,
    };
    with_chunk(Data::new(logits, labels, a.ignore_index)?, a)
}

/// Files over 256 MiB show their progress on stderr when it is a terminal.
fn wants_progress(d: &Data) -> bool {
    d.logits.bytes > 256 << 20 && std::io::stderr().is_terminal()
}

fn run_pass(d: &Data, spec: &PassSpec, what: &str) -> Result<Summary, String> {
    let t0 = Instant::now();
    if d.progress {
        eprintln!("{what}: {}", human(d.logits.bytes as f64));
    }
    let s = metrics::pass(d, spec)?;
    if d.progress {
        eprintln!("\r{what}: done in {:.1} s", t0.elapsed().as_secs_f64());
    }
    Ok(s)
}

fn human(b: f64) -> String {
    if b >= 1e9 { format!("{:.2} GB", b / 1e9) } else { format!("{:.1} MB", b / 1e6) }
}

/// Runs `smax eval`.
pub fn run(a: Args) -> Result<(), String> {
    if a.bins == 0 {
        return Err("--bins must be at least 1".into());
    }
    if a.topk == 0 {
        return Err("--topk must be at least 1".into());
    }
    let t = a.temperature.unwrap_or(1.0);
    if !(t.is_finite() && t > 0.0 && (1.0 / t).is_finite() && t / 2.0 > 0.0) {
        return Err(format!("--temperature {t}: must be finite and > 0"));
    }
    let t0 = Instant::now();
    let d = open_pair(&a)?;
    let has_labels = d.labels.is_some();
    if a.fit_temperature && !has_labels {
        return Err("--fit-temperature needs labels (--labels or --labels-key)".into());
    }
    let spec = PassSpec {
        temperature: t,
        bins: if a.binning == Binning::Width { a.bins } else { 0 },
        topk: a.topk,
        keep_confidences: a.binning == Binning::Mass && has_labels,
        keep_scores: a.ood.is_some(),
    };
    let s = run_pass(&d, &spec, "evaluating")?;
    let mut passes = 1;
    if has_labels && s.n == 0 {
        return Err(format!(
            "nothing to evaluate: of {} rows, {} have the ignore label {} and {} non-finite logits",
            d.rows, s.ignored, a.ignore_index, s.nonfinite
        ));
    }
    let before = has_labels.then(|| report(&s, t, &a));
    let mut fit = None;
    let mut after = None;
    if a.fit_temperature {
        let (mut calls, mut read_error) = (0, None);
        let f = smax::calibrate::fit_temperature_with(
            |beta| {
                calls += 1;
                metrics::nll_moments(&d, beta).map_err(|e| {
                    read_error = Some(e);
                    smax::Error::BadParameter { name: "logits", value: "unreadable".into(), expected: "readable" }
                })
            },
            &smax::calibrate::FitOptions { tolerance: 1e-7, ..Default::default() },
        )
        .map_err(|e| read_error.take().unwrap_or_else(|| e.to_string()))?;
        passes += calls;
        let s2 = run_pass(&d, &PassSpec { temperature: f.temperature, keep_scores: false, ..spec }, "scaled")?;
        passes += 1;
        after = Some(report(&s2, f.temperature, &a));
        fit = Some(Fit { temperature: f.temperature, passes: calls, converged: f.converged, capped: f.capped });
    }
    let mut bytes_read = d.logits.bytes as f64 * passes as f64;
    let mut ood: Option<(u64, Ood)> = None;
    if let Some(p) = &a.ood {
        let od = with_chunk(Data::new(Array::open(p, a.key.as_deref())?, None, a.ignore_index)?, &a)?;
        if od.classes != d.classes {
            return Err(format!("--ood: {} classes, the logits have {}", od.classes, d.classes));
        }
        let so = run_pass(&od, &PassSpec { keep_confidences: false, bins: 0, ..spec }, "ood")?;
        passes += 1;
        bytes_read += od.logits.bytes as f64;
        let col = |v: &[[f64; 3]], i: usize| v.iter().map(|s| s[i]).collect::<Vec<f64>>();
        let names = ["MSP", "max-logit", "energy"];
        let figs = (0..3)
            .map(|i| {
                let (p, n) = (col(&s.scores, i), col(&so.scores, i));
                (names[i], metrics::auroc(&p, &n), metrics::fpr_at_95(&p, &n))
            })
            .collect();
        ood = Some((so.n, figs));
    }
    let secs = t0.elapsed().as_secs_f64();
    let io = (secs, passes, bytes_read);
    print_text(&a, &d, &s, before.as_ref(), fit.as_ref(), after.as_ref(), ood.as_ref(), io);
    if let Some(p) = &a.plot {
        let Some(b) = &before else { return Err("--plot needs labels".into()) };
        plot::reliability(p, b, after.as_ref()).map_err(|e| format!("{}: {e}", p.display()))?;
        println!("reliability diagram: {}", p.display());
    }
    if let Some(j) = &a.json {
        let text = json(&a, &d, &s, before.as_ref(), fit.as_ref(), after.as_ref(), ood.as_ref(), io);
        std::fs::write(j, text).map_err(|e| format!("{}: {e}", j.display()))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn print_text(
    a: &Args,
    d: &Data,
    s: &Summary,
    before: Option<&Report>,
    fit: Option<&Fit>,
    after: Option<&Report>,
    ood: Option<&(u64, Ood)>,
    (secs, passes, bytes): (f64, usize, f64),
) {
    println!(
        "logits   {} ({}, shape {:?}: {} rows of {} classes)",
        d.logits.name,
        d.logits.dtype.name(),
        d.logits.shape,
        d.rows,
        d.classes
    );
    if let Some(l) = &d.labels {
        println!("labels   {} ({})", l.name, l.dtype.name());
    }
    print!("rows     {} evaluated", s.n);
    if s.ignored > 0 {
        print!(", {} ignored (label {})", s.ignored, a.ignore_index);
    }
    if s.nonfinite > 0 {
        print!(", {} skipped for non-finite logits (first: row {})", s.nonfinite, s.first_nonfinite.unwrap_or(0));
    }
    println!();
    let show = |r: &Report| {
        println!("at temperature {}", r.temperature);
        println!("  top-1 accuracy  {:.4}    top-{} accuracy  {:.4}", r.top1, a.topk, r.topk);
        println!(
            "  NLL             {:.4} nats  {:.4} bits  perplexity {:.4}",
            r.nll,
            r.nll / std::f64::consts::LN_2,
            r.nll.exp()
        );
        println!("  Brier           {:.4}", r.brier);
        println!(
            "  ECE             {:.4}    MCE {:.4}    ({} {} bins; mean confidence {:.4})",
            r.ece,
            r.mce,
            a.bins,
            if a.binning == Binning::Width { "equal-width" } else { "equal-mass" },
            r.mean_confidence
        );
    };
    match before {
        Some(r) => {
            show(r);
            println!("  {:>15}  {:>9}  {:>8}  {:>10}  {:>7}", "bin", "count", "accuracy", "confidence", "gap");
            for b in r.bins.iter() {
                let gap = if b.count > 0 { format!("{:+.4}", b.accuracy - b.confidence) } else { String::new() };
                let num = |x: f64| if x.is_nan() { "-".to_string() } else { format!("{x:.4}") };
                println!(
                    "  ({:.3}, {:.3}]  {:>9}  {:>8}  {:>10}  {:>7}",
                    b.lo,
                    b.hi,
                    b.count,
                    num(b.accuracy),
                    num(b.confidence),
                    gap
                );
            }
        }
        None => {
            println!("no labels: mean confidence (max softmax probability) {:.4}", s.confidence / s.n.max(1) as f64)
        }
    }
    if let (Some(f), Some(r), Some(b)) = (fit, after, before) {
        println!(
            "fitted temperature {:.6}{}{} ({} passes of the fit)",
            f.temperature,
            if f.capped { " (capped)" } else { "" },
            if f.converged { "" } else { " (not converged)" },
            f.passes
        );
        println!("  NLL   {:.4} -> {:.4}", b.nll, r.nll);
        println!("  ECE   {:.4} -> {:.4}", b.ece, r.ece);
        println!("  Brier {:.4} -> {:.4}", b.brier, r.brier);
    }
    if let Some((n, figs)) = ood {
        println!("out-of-distribution: {n} rows against {} (in-distribution positive)", s.n);
        println!("  {:<10} {:>7} {:>8}", "score", "AUROC", "FPR@95");
        for (name, au, fpr) in figs {
            println!("  {name:<10} {au:>7.4} {fpr:>8.4}");
        }
    }
    println!("read {} in {passes} pass(es) over the files, {secs:.2} s ({:.2} GB/s)", human(bytes), bytes / 1e9 / secs);
}

fn num(x: f64) -> String {
    if x.is_finite() { format!("{x:e}") } else { "null".into() }
}

fn report_json(r: &Report) -> String {
    let bins: Vec<String> = r
        .bins
        .iter()
        .map(|b| {
            format!(
                "{{\"lo\": {}, \"hi\": {}, \"count\": {}, \"accuracy\": {}, \"confidence\": {}}}",
                num(b.lo),
                num(b.hi),
                b.count,
                num(b.accuracy),
                num(b.confidence)
            )
        })
        .collect();
    format!(
        "{{\"temperature\": {}, \"n\": {}, \"top1\": {}, \"topk\": {}, \"nll\": {}, \"nll_bits\": {}, \"perplexity\": {}, \"brier\": {}, \"mean_confidence\": {}, \"ece\": {}, \"mce\": {}, \"bins\": [{}]}}",
        num(r.temperature),
        r.n,
        num(r.top1),
        num(r.topk),
        num(r.nll),
        num(r.nll / std::f64::consts::LN_2),
        num(r.nll.exp()),
        num(r.brier),
        num(r.mean_confidence),
        num(r.ece),
        num(r.mce),
        bins.join(", ")
    )
}

#[allow(clippy::too_many_arguments)]
fn json(
    a: &Args,
    d: &Data,
    s: &Summary,
    before: Option<&Report>,
    fit: Option<&Fit>,
    after: Option<&Report>,
    ood: Option<&(u64, Ood)>,
    (secs, passes, bytes): (f64, usize, f64),
) -> String {
    let esc = |p: &str| p.replace('\\', "\\\\").replace('"', "\\\"");
    let mut f = vec![
        format!("\"logits\": \"{}\"", esc(&d.logits.name)),
        format!("\"dtype\": \"{}\"", d.logits.dtype.name()),
        format!("\"rows\": {}", d.rows),
        format!("\"classes\": {}", d.classes),
        format!("\"evaluated\": {}", s.n),
        format!("\"ignored\": {}", s.ignored),
        format!("\"nonfinite\": {}", s.nonfinite),
        format!("\"topk_k\": {}", a.topk),
        format!("\"binning\": \"{}\"", if a.binning == Binning::Width { "width" } else { "mass" }),
        format!("\"mean_confidence\": {}", num(s.confidence / s.n.max(1) as f64)),
        format!("\"seconds\": {}", num(secs)),
        format!("\"passes\": {passes}"),
        format!("\"bytes\": {}", d.logits.bytes),
        format!("\"bytes_read\": {bytes}"),
        format!("\"gb_per_s\": {}", num(bytes / 1e9 / secs)),
    ];
    if let Some(r) = before {
        f.push(format!("\"metrics\": {}", report_json(r)));
    }
    if let (Some(ft), Some(r)) = (fit, after) {
        f.push(format!(
            "\"fit\": {{\"temperature\": {}, \"passes\": {}, \"converged\": {}, \"capped\": {}, \"metrics\": {}}}",
            num(ft.temperature),
            ft.passes,
            ft.converged,
            ft.capped,
            report_json(r)
        ));
    }
    if let Some((n, figs)) = ood {
        let items: Vec<String> = figs
            .iter()
            .map(|(name, au, fpr)| format!("\"{name}\": {{\"auroc\": {}, \"fpr95\": {}}}", num(*au), num(*fpr)))
            .collect();
        f.push(format!("\"ood\": {{\"rows\": {n}, {}}}", items.join(", ")));
    }
    format!("{{{}}}\n", f.join(", "))
}
