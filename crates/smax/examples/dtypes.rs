//! Times softmax and log-softmax for each element type on the same logical shapes (2 threads
//! by default, rayon's pool), median of 9 runs into a preallocated output:
//!
//! ```text
//! cargo run --release -p smax --example dtypes
//! ```
//!
//! f16 and bf16 move half the bytes of f32 but run the same f32 arithmetic (converted in
//! tiles), so on this development VM they are compute-bound: the figure to watch is how close
//! they come to the f32 time, not to half of it.

use smax::{Element, Options, View, ViewMut, bf16, f16, log_softmax, softmax};
use std::time::Instant;

fn median_ms(mut f: impl FnMut(), n: usize) -> f64 {
    f();
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[n / 2] * 1e3
}

fn time<T: Element>(rows: usize, cols: usize) -> Result<(f64, f64), smax::Error> {
    let n = rows * cols;
    let x: Vec<T> = (0..n)
        .map(|i| T::from_f32((i.wrapping_mul(2_654_435_761) % 1000) as f32 * 0.01))
        .collect();
    let mut y = vec![T::default(); n];
    let o = Options::default();
    let mut err = Ok(());
    let mut go = |log: bool| {
        median_ms(
            || {
                let r = View::rows(&x, rows, cols).and_then(|xv| {
                    let yv = ViewMut::rows(&mut y, rows, cols)?;
                    if log {
                        log_softmax(xv, yv, &o)
                    } else {
                        softmax(xv, yv, &o)
                    }
                });
                if r.is_err() {
                    err = r;
                }
            },
            9,
        )
    };
    let (s, l) = (go(false), go(true));
    err.map(|_| (s, l))
}

fn main() -> Result<(), smax::Error> {
    println!(
        "{:>12}  {:>22}  {:>22}  {:>22}",
        "shape", "f32 softmax/log ms", "bf16 softmax/log ms", "f16 softmax/log ms"
    );
    for (rows, cols) in [(16384usize, 4096usize), (2048, 32768), (64, 1 << 20)] {
        let a = time::<f32>(rows, cols)?;
        let b = time::<bf16>(rows, cols)?;
        let c = time::<f16>(rows, cols)?;
        println!(
            "{:>12}  {:>10.1} / {:>9.1}  {:>10.1} / {:>9.1}  {:>10.1} / {:>9.1}",
            format!("{rows}x{cols}"),
            a.0,
            a.1,
            b.0,
            b.1,
            c.0,
            c.1
        );
    }
    Ok(())
}
