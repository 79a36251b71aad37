//! `smax bench`: the switch between the suites (core, loss, decode, attention).

pub use crate::measure::{Args, Suite};

/// Runs the suite `a.suite` asks for.
pub fn run(a: Args) -> Result<(), String> {
    if !a.dtype.is_empty() && a.suite != Suite::Core {
        return Err("--dtype applies to the core suite only".into());
    }
    match a.suite {
        Suite::Core => crate::bench_core::run(a),
        Suite::Loss => crate::bench_loss::run(a),
        Suite::Decode => crate::bench_decode::run(a),
        Suite::Attention => crate::bench_attention::run(a),
    }
}
