//! `smax`: the command-line tool. `smax eval` judges a model's logits from a file (accuracy,
//! NLL, Brier, calibration with a fitted temperature, OOD separability, a reliability
//! diagram); `smax bench` times every normaliser side by side with the naive loop, the peers
//! (candle-nn, rten-vecmath) and the memory rooflines (a plain copy and a plain read of the
//! same bytes).

mod alloc;
mod bench;
mod bench_attention;
mod bench_core;
mod bench_decode;
mod bench_linear;
mod bench_loss;
mod eval;
mod measure;
mod peers;
mod repro;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

#[derive(Parser)]
#[command(name = "smax", version, about = "The softmax family, exact and at memory speed")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Evaluate logits from a file: accuracy, NLL, Brier, ECE, temperature, OOD, plots.
    Eval(eval::Args),
    /// Reproduce a paper's claim at small scale (smax repro --list).
    Repro(repro::Args),
    /// Time each op side by side (smax's algorithms, naive, peers, copy/read rooflines).
    Bench(bench::Args),
    /// Print the SIMD levels this CPU has and the one smax uses.
    Info,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Eval(a) => eval::run(a),
        Cmd::Repro(a) => repro::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Info => {
            let avail: Vec<_> = smax::SimdLevel::available().iter().map(|l| l.name()).collect();
            println!("simd levels available: {}", avail.join(", "));
            println!("simd level in use:     {}", smax::SimdLevel::default_level().name());
            println!("threads (rayon):       {}", rayon::current_num_threads());
            println!("peers built in:        {}", peers::ENABLED);
            Ok(())
        }
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
