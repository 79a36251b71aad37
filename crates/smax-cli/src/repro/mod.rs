//! `smax repro NAME`: small-scale reproductions of the papers' claims behind smax's algorithms,
//! each printing our figures beside the paper's (or saying why the comparison is qualitative)
//! and writing JSON. Every reproduction has three presets: `tiny` (the smoke tests, seconds),
//! `quick` (the default, minutes on two cores) and `full` (the paper's setup where it fits on
//! a CPU). The shared trainer (an MLP with its backward pass, Adam, seeded synthetic data)
//! lives in `train.rs`; no reproduction carries its own.

mod grokking;
mod losses;
mod numerics;
mod ood;
mod train;

use clap::{Args as ClapArgs, ValueEnum};
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub enum Preset {
    /// Seconds: what the smoke tests run.
    Tiny,
    /// Minutes on two cores (the default).
    Quick,
    /// The paper's setup where it fits a CPU (can take an hour).
    Full,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The reproduction (see --list).
    pub name: Option<String>,
    /// List the reproductions.
    #[arg(long)]
    pub list: bool,
    /// Size of the run.
    #[arg(long, value_enum, default_value_t = Preset::Quick)]
    pub preset: Preset,
    /// Shorthand for --preset full.
    #[arg(long)]
    pub full: bool,
    /// Seed of the synthetic data and initialisations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the tables as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// A table cell.
#[derive(Clone, Debug)]
pub enum Cell {
    Num(f64),
    Int(i64),
    Text(String),
}

impl Cell {
    fn show(&self) -> String {
        match self {
            Cell::Num(v) if v.is_nan() => "-".into(),
            Cell::Num(v) if *v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) => format!("{v:.3e}"),
            Cell::Num(v) => format!("{v:.4}"),
            Cell::Int(v) => v.to_string(),
            Cell::Text(s) => s.clone(),
        }
    }
    fn json(&self) -> String {
        match self {
            Cell::Num(v) if v.is_finite() => format!("{v:e}"),
            Cell::Num(_) => "null".into(),
            Cell::Int(v) => v.to_string(),
            Cell::Text(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        }
    }
}

impl From<f64> for Cell {
    fn from(v: f64) -> Cell {
        Cell::Num(v)
    }
}
impl From<usize> for Cell {
    fn from(v: usize) -> Cell {
        Cell::Int(v as i64)
    }
}
impl From<&str> for Cell {
    fn from(v: &str) -> Cell {
        Cell::Text(v.into())
    }
}
impl From<String> for Cell {
    fn from(v: String) -> Cell {
        Cell::Text(v)
    }
}

/// One table of a reproduction.
pub struct Table {
    pub title: String,
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(title: impl Into<String>, header: &[&'static str]) -> Table {
        Table { title: title.into(), header: header.to_vec(), rows: Vec::new() }
    }
    pub fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }
    fn print(&self) {
        println!("\n{}", self.title);
        let cells: Vec<Vec<String>> = self.rows.iter().map(|r| r.iter().map(Cell::show).collect()).collect();
        let w: Vec<usize> = (0..self.header.len())
            .map(|i| cells.iter().map(|r| r.get(i).map_or(0, |s| s.len())).max().unwrap_or(0).max(self.header[i].len()))
            .collect();
        let line = |r: Vec<String>| {
            let s: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:>width$}", width = w[i])).collect();
            println!("  {}", s.join("  "));
        };
        line(self.header.iter().map(|s| s.to_string()).collect());
        for r in cells {
            line(r);
        }
    }
    fn json(&self) -> String {
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                let f: Vec<String> = self.header.iter().zip(r).map(|(h, c)| format!("\"{h}\": {}", c.json())).collect();
                format!("{{{}}}", f.join(", "))
            })
            .collect();
        format!("{{\"title\": {}, \"rows\": [{}]}}", Cell::Text(self.title.clone()).json(), rows.join(", "))
    }
}

/// What a reproduction returns.
pub struct Outcome {
    pub tables: Vec<Table>,
    /// The paper's figure or claim, quoted.
    pub paper: String,
    /// Ours against it, in a sentence (or why the comparison is qualitative).
    pub verdict: String,
}

type Runner = fn(Preset, u64) -> Result<Outcome, String>;

/// The reproductions: name, the claim, the runner.
const ALL: &[(&str, &str, Runner)] = &[
    ("two-pass", "two-pass vs three-pass (and online) softmax out of cache on U[-1000, 1000]", numerics::two_pass),
    ("grokking", "modular addition: softmax CE vs StableMax CE vs orthogonal gradient (perp-Grad)", grokking::run),
    ("cce-memory", "linear cross-entropy: peak memory and time against the materialized logits", losses::cce_memory),
    ("clipped-softmax", "clipped softmax: exact zeros at a finite logit gap", numerics::clipped_softmax),
    ("lssa-length", "attention entropy and max weight against length: softmax, LSSA, LSSAR", numerics::lssa_length),
    (
        "unified-max",
        "unified-max split-K decoding: fallback rate and speed against synchronised rescaling",
        numerics::unified_max,
    ),
    (
        "decoupled-floor",
        "multi-positive softmax loss floor log m against the decoupled loss; P@1",
        losses::decoupled_floor,
    ),
    ("quantizers", "post-softmax quantization MSE: uniform, log2, log-sqrt2, SULQ at 3/4/6 bits", numerics::quantizers),
    ("label-noise", "CE, GCE and MAE under 40 % symmetric label noise", losses::label_noise),
    ("mahalanobis-ood", "OOD AUROC of Mahalanobis, MSP and energy on a synthetic shift", ood::mahalanobis),
];

/// Runs `smax repro`.
pub fn run(a: Args) -> Result<(), String> {
    if a.list || a.name.is_none() {
        println!("smax repro NAME [--preset tiny|quick|full] [--json out.json]:");
        for (n, what, _) in ALL {
            println!("  {n:<16} {what}");
        }
        return Ok(());
    }
    let name = a.name.as_deref().unwrap_or_default();
    let Some((n, what, f)) = ALL.iter().find(|(n, _, _)| *n == name) else {
        return Err(format!("no reproduction '{name}' (smax repro --list)"));
    };
    let preset = if a.full { Preset::Full } else { a.preset };
    println!("{n}: {what} (preset {preset:?}, seed {})", a.seed);
    let t0 = std::time::Instant::now();
    let o = f(preset, a.seed)?;
    for t in &o.tables {
        t.print();
    }
    println!("\npaper:   {}", o.paper);
    println!("ours:    {}", o.verdict);
    let secs = t0.elapsed().as_secs_f64();
    println!("({secs:.1} s)");
    if let Some(j) = &a.json {
        let tables: Vec<String> = o.tables.iter().map(Table::json).collect();
        let text = format!(
            "{{\"name\": \"{n}\", \"preset\": \"{preset:?}\", \"seed\": {}, \"seconds\": {secs:e}, \"paper\": {}, \"verdict\": {}, \"tables\": [{}]}}\n",
            a.seed,
            Cell::Text(o.paper.clone()).json(),
            Cell::Text(o.verdict.clone()).json(),
            tables.join(", ")
        );
        std::fs::write(j, text).map_err(|e| format!("{}: {e}", j.display()))?;
    }
    Ok(())
}

/// A seeded generator (SplitMix64) with uniform and normal draws.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// Median wall time of `reps` runs of `f` (seconds).
pub fn median_time(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t0 = std::time::Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}
