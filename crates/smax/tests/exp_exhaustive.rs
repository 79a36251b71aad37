//! The exhaustive exp sweep: every f32 in [-87.33654, 0] at every SIMD level, against f64
//! `exp`. About 1.1e9 inputs per level; run with
//! `cargo test --release -p smax --test exp_exhaustive -- --ignored --nocapture`.

use smax::{SimdLevel, math};

fn ulp_err(x: f32, got: f32) -> f64 {
    let want = (x as f64).exp();
    let w32 = want as f32;
    let ulp = if w32 < f32::MIN_POSITIVE {
        2f64.powi(-149)
    } else {
        let b = w32.to_bits();
        (f32::from_bits(b + 1) as f64 - w32 as f64).min(w32 as f64 - f32::from_bits(b - 1) as f64)
    };
    (got as f64 - want).abs() / ulp
}

#[test]
#[ignore = "exhaustive: ~1.1e9 inputs per SIMD level; run before resolving kernel changes"]
fn exp_exhaustive_ulp() {
    let lo = (-87.33654f32).to_bits();
    let hi = (-0.0f32).to_bits();
    for level in SimdLevel::available() {
        let mut worst = (0.0f64, 0.0f32);
        let mut sum = 0.0f64;
        let mut count = 0u64;
        let mut xs = vec![0.0f32; 1 << 20];
        let mut ys = vec![0.0f32; 1 << 20];
        let mut b = hi;
        loop {
            let mut n = 0;
            while n < xs.len() && b <= lo {
                xs[n] = f32::from_bits(b);
                n += 1;
                b += 1;
            }
            if n == 0 {
                break;
            }
            math::exp_nonpositive(&xs[..n], &mut ys[..n], Some(level)).unwrap();
            for i in 0..n {
                let e = ulp_err(xs[i], ys[i]);
                sum += e;
                if e > worst.0 {
                    worst = (e, xs[i]);
                }
            }
            count += n as u64;
        }
        println!(
            "{level:?}: {count} inputs, max {:.3} ULP at x = {:e}, mean {:.4} ULP",
            worst.0,
            worst.1,
            sum / count as f64
        );
        assert!(worst.0 <= 2.0, "{level:?}: max {} ULP at {}", worst.0, worst.1);
    }
}
