//! The vocabulary-parallel ops checked against the single-process ones, on every rank:
//! `mpirun -n 4 target/release/examples/mpi_vocab_parallel` (add `--allow-run-as-root
//! --oversubscribe` as root or with more ranks than cores). Each rank holds an uneven slice
//! of the vocabulary:
//! - cross-entropy over a 37 x 1000 logit matrix: for each option set the loss, the row
//!   outputs and this rank's gradient slice must match `smax::loss::cross_entropy` on the
//!   whole matrix;
//! - linear cross-entropy with a slice of a 301 x 12 classifier: loss, row outputs, `dh`,
//!   this rank's `dW` and `db` against `smax::loss::linear_cross_entropy` on the whole `W`;
//! - sampling over 16 rows of 1000 logits (ties, masked tokens): the same tokens and stats as
//!   `smax::sample::sample` on the whole rows, for every filter combination and both draws;
//!
//! and every shared result (losses, `dh`, tokens) must be bitwise the same on every rank.
//! Exits 1 on any mismatch. `--bench` times the sharded cross-entropies against the
//! single-process ones and prints the bytes exchanged.

use mpi::traits::{Communicator, CommunicatorCollectives};
use smax::loss::{
    AllIgnored, CrossEntropyOptions, LinearCrossEntropyOptions, LinearGrads, LinearInputs, LinearShape, Reduction,
    RowOutputs, Targets, cross_entropy, linear_cross_entropy,
};
use smax::sample::{Draw, SampleOptions, sample};
use smax::{View, ViewMut};
use smax_mpi::{vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy, vocab_parallel_sample};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// This rank's slice `[start, start + len)` of `v` columns among `p` ranks (uneven).
fn slice(v: usize, p: usize, rank: usize) -> (usize, usize) {
    let (base, rem) = (v / p, v % p);
    let start = rank * base + rank.min(rem);
    (start, base + usize::from(rank < rem))
}

fn main() {
    let universe = mpi::initialize().expect("MPI init");
    let world = universe.world();
    let (rank, p) = (world.rank() as usize, world.size() as usize);
    if std::env::args().any(|a| a == "--bench") {
        bench(&world, rank, p);
        return;
    }
    let (rows, v) = (37usize, 1000usize);
    let mut rng = Rng(7);
    let mut z: Vec<f32> = (0..rows * v).map(|_| ((rng.next() - 0.5) * 12.0) as f32).collect();
    z[5 * v + 3] = 40.0; // a dominant logit
    // A masked variant: row 6 masked over its first 600 classes (whole slices of it at 2 and
    // 4 ranks), row 8 masked everywhere (its loss is +inf, its gradient 0, when its target is
    // not ignored).
    let mut z_masked = z.clone();
    z_masked[6 * v..6 * v + 600].fill(f32::NEG_INFINITY);
    z_masked[8 * v..9 * v].fill(f32::NEG_INFINITY);
    let mut y: Vec<i64> = (0..rows).map(|_| (rng.next() * v as f64) as i64 % v as i64).collect();
    y[4] = -100;
    y[9] = -100;
    y[6] = 700;
    y[8] = -100;
    let mut y_masked = y.clone();
    y_masked[8] = 5;
    let weights: Vec<f32> = (0..v).map(|k| 0.5 + (k % 7) as f32 * 0.25).collect();
    let (start, len) = slice(v, p, rank);
    let shard_of =
        |z: &[f32]| -> Vec<f32> { (0..rows).flat_map(|r| z[r * v + start..r * v + start + len].to_vec()).collect() };
    let (shard, shard_masked) = (shard_of(&z), shard_of(&z_masked));
    let base = CrossEntropyOptions::default();
    let cases: Vec<(&str, CrossEntropyOptions, Vec<i64>)> = vec![
        ("default", base, y.clone()),
        ("smoothing 0.1", base.label_smoothing(0.1), y.clone()),
        ("z-loss 1e-4", base.z_loss(1e-4), y.clone()),
        ("temperature 0.7", base.temperature(0.7), y.clone()),
        ("class weights", CrossEntropyOptions { class_weights: Some(&weights), ..base }, y.clone()),
        (
            "weights + smoothing",
            CrossEntropyOptions { class_weights: Some(&weights), label_smoothing: 0.2, ..base },
            y.clone(),
        ),
        ("softcap 5", base.softcap(5.0), y.clone()),
        ("sum", base.reduction(Reduction::Sum), y.clone()),
        ("none", base.reduction(Reduction::None), y.clone()),
        ("masked rows, none", base.reduction(Reduction::None).temperature(1.5), y_masked.clone()),
        ("masked rows, softcap 3", base.softcap(3.0), y_masked.clone()),
        ("masked rows, z-loss", base.z_loss(1e-3), y_masked),
        ("every row ignored", base, vec![-100; rows]),
        ("every row ignored, NaN", CrossEntropyOptions { all_ignored: AllIgnored::Nan, ..base }, vec![-100; rows]),
    ];
    let mut failures = 0;
    for (name, o, t) in &cases {
        let masked = name.starts_with("masked");
        let (z, shard) = if masked { (&z_masked, &shard_masked) } else { (&z, &shard) };
        let mut g_full = vec![0.0f32; rows * v];
        let (mut l_full, mut lse_full) = (vec![0.0f64; rows], vec![0.0f64; rows]);
        let want = cross_entropy(
            View::rows(z, rows, v).unwrap(),
            Targets::Classes(t),
            Some(ViewMut::rows(&mut g_full, rows, v).unwrap()),
            RowOutputs { loss: Some(&mut l_full), lse: Some(&mut lse_full), ..Default::default() },
            o,
        )
        .unwrap();
        let mut g = vec![0.0f32; rows * len];
        let (mut l_rows, mut lse) = (vec![0.0f64; rows], vec![0.0f64; rows]);
        let got = vocab_parallel_cross_entropy(
            &world,
            View::rows(shard, rows, len).unwrap(),
            start,
            t,
            Some(ViewMut::rows(&mut g, rows, len).unwrap()),
            RowOutputs { loss: Some(&mut l_rows), lse: Some(&mut lse), ..Default::default() },
            o,
        )
        .unwrap();
        let close =
            |a: f64, b: f64, tol: f64| a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * (1.0 + b.abs());
        let mut ok = close(got.loss, want.loss, 2e-6)
            && close(got.z_loss, want.z_loss, 2e-6)
            && got.valid_rows == want.valid_rows;
        for r in 0..rows {
            ok &= close(l_rows[r], l_full[r], 2e-6);
            if t[r] != -100 {
                ok &= close(lse[r], lse_full[r], 2e-6);
            }
        }
        let gmax = g_full.iter().fold(1e-30f32, |m, x| m.max(x.abs()));
        for r in 0..rows {
            for j in 0..len {
                let (a, b) = (g[r * len + j], g_full[r * v + start + j]);
                if (a - b).abs() > 2e-6 * gmax && !(a.is_nan() && b.is_nan()) {
                    if ok {
                        eprintln!("rank {rank} {name}: grad[{r}][{}] {a} vs {b}", start + j);
                    }
                    ok = false;
                }
            }
        }
        // Bitwise the same loss on every rank.
        let bits = got.loss.to_bits() as f64;
        let mut all = vec![0.0f64; p];
        world.all_gather_into(&bits, &mut all[..]);
        ok &= all.iter().all(|&b| b.to_bits() == all[0].to_bits());
        if !ok {
            eprintln!("rank {rank} {name}: loss {} vs {} (z {} vs {})", got.loss, want.loss, got.z_loss, want.z_loss);
            failures += 1;
        } else if rank == 0 {
            println!("ok  {name:<24} loss {:.12} (single process {:.12})", got.loss, want.loss);
        }
    }
    // Errors reach every rank: a slice that does not tile the vocabulary.
    let bad_start = if rank == p - 1 && p > 1 { start + 1 } else { start };
    let e = vocab_parallel_cross_entropy(
        &world,
        View::rows(&shard, rows, len).unwrap(),
        bad_start,
        &y,
        None,
        RowOutputs::default(),
        &base,
    );
    if p > 1 && e.is_ok() {
        eprintln!("rank {rank}: a mis-tiled vocabulary was accepted");
        failures += 1;
    }
    // A gradient of the wrong shape on rank 0 only: an error on every rank.
    let mut g = vec![0.0f32; rows * len];
    let g_rows = if rank == 0 { rows - 1 } else { rows };
    let e = vocab_parallel_cross_entropy(
        &world,
        View::rows(&shard, rows, len).unwrap(),
        start,
        &y,
        Some(ViewMut::rows(&mut g[..g_rows * len], g_rows, len).unwrap()),
        RowOutputs::default(),
        &base,
    );
    if e.is_ok() {
        eprintln!("rank {rank}: a gradient of the wrong shape (on rank 0) was accepted");
        failures += 1;
    }
    failures += check_linear(&world, rank, p);
    failures += check_sampling(&world, rank, p);
    let mut total = 0i32;
    world.all_reduce_into(&failures, &mut total, mpi::collective::SystemOperation::sum());
    if rank == 0 {
        println!(
            "{p} ranks: {}",
            if total == 0 { "all checks passed".to_string() } else { format!("{total} failures") }
        );
    }
    if total != 0 {
        std::process::exit(1);
    }
}

/// Whether `x` (a per-rank value's bits) is the same on every rank.
fn same_everywhere<C: Communicator>(world: &C, bits: &[u64]) -> bool {
    let p = world.size() as usize;
    let mine: Vec<f64> = bits.iter().map(|&b| f64::from_bits(b)).collect();
    let mut all = vec![0.0f64; mine.len() * p];
    world.all_gather_into(&mine[..], &mut all[..]);
    all.chunks(mine.len().max(1)).all(|c| c.iter().zip(&mine).all(|(a, b)| a.to_bits() == b.to_bits()))
}

/// Vocabulary-parallel linear cross-entropy against `linear_cross_entropy` on the whole
/// classifier. Returns the number of failed cases.
fn check_linear<C: Communicator>(world: &C, rank: usize, p: usize) -> i32 {
    let (n, d, v) = (23usize, 12usize, 301usize);
    let mut rng = Rng(17);
    let h: Vec<f32> = (0..n * d).map(|_| ((rng.next() - 0.5) * 2.0) as f32).collect();
    let w: Vec<f32> = (0..v * d).map(|_| ((rng.next() - 0.5) * 1.5) as f32).collect();
    let bias: Vec<f32> = (0..v).map(|_| ((rng.next() - 0.5) * 0.5) as f32).collect();
    let mut y: Vec<i64> = (0..n).map(|_| (rng.next() * v as f64) as i64 % v as i64).collect();
    y[3] = -100;
    let (start, len) = slice(v, p, rank);
    let base = LinearCrossEntropyOptions::default();
    let cases: Vec<(&str, LinearCrossEntropyOptions, bool)> = vec![
        ("linear: default", base, false),
        ("linear: bias", base, true),
        ("linear: smoothing 0.1", base.label_smoothing(0.1), true),
        ("linear: z-loss, softcap", base.z_loss(1e-3).softcap(4.0), false),
        ("linear: sum, grad scale", base.reduction(Reduction::Sum).grad_scale(0.25), true),
        ("linear: none", base.reduction(Reduction::None), false),
        ("linear: small tiles", base.tiles(smax::loss::LinearTiles { tokens: 5, vocab: 7 }).label_smoothing(0.2), true),
    ];
    let mut failures = 0;
    for (name, o, with_bias) in &cases {
        let (mut dh_f, mut dw_f, mut db_f) = (vec![0.0f32; n * d], vec![0.0f32; v * d], vec![0.0f32; v]);
        let (mut l_f, mut lse_f) = (vec![0.0f64; n], vec![0.0f64; n]);
        let want = linear_cross_entropy(
            LinearShape { n, d, v },
            LinearInputs { h: &h, w: &w, bias: with_bias.then_some(&bias[..]), targets: &y },
            LinearGrads { dh: Some(&mut dh_f), dw: Some(&mut dw_f), dbias: Some(&mut db_f) },
            RowOutputs { loss: Some(&mut l_f), lse: Some(&mut lse_f), ..Default::default() },
            None,
            o,
        )
        .unwrap();
        let (mut dh, mut dw, mut db) = (vec![0.0f32; n * d], vec![0.0f32; len * d], vec![0.0f32; len]);
        let (mut l, mut lse) = (vec![0.0f64; n], vec![0.0f64; n]);
        let got = vocab_parallel_linear_cross_entropy(
            world,
            LinearShape { n, d, v: len },
            LinearInputs {
                h: &h,
                w: &w[start * d..(start + len) * d],
                bias: with_bias.then_some(&bias[start..start + len]),
                targets: &y,
            },
            start,
            LinearGrads { dh: Some(&mut dh), dw: Some(&mut dw), dbias: Some(&mut db) },
            RowOutputs { loss: Some(&mut l), lse: Some(&mut lse), ..Default::default() },
            None,
            o,
        )
        .unwrap();
        let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * (1.0 + b.abs());
        let mut bad = Vec::new();
        if !close(got.loss, want.loss, 2e-6) || !close(got.z_loss, want.z_loss, 2e-6) {
            bad.push(format!("loss {} vs {}", got.loss, want.loss));
        }
        if (0..n).any(|r| !close(l[r], l_f[r], 2e-6) || !close(lse[r], lse_f[r], 2e-6)) {
            bad.push("row outputs".into());
        }
        for (what, a, b) in [
            ("dh", &dh[..], &dh_f[..]),
            ("dw", &dw[..], &dw_f[start * d..(start + len) * d]),
            ("db", &db[..], &db_f[start..start + len]),
        ] {
            let gmax = b.iter().fold(1e-30f32, |m, x| m.max(x.abs()));
            if let Some(i) = (0..a.len()).find(|&i| (a[i] - b[i]).abs() > 2e-5 * gmax) {
                bad.push(format!("{what}[{i}] {} vs {}", a[i], b[i]));
            }
        }
        let mut bits = vec![got.loss.to_bits()];
        bits.extend(dh.iter().map(|x| x.to_bits() as u64));
        if !same_everywhere(world, &bits) {
            bad.push("loss or dh differ across ranks".into());
        }
        if bad.is_empty() {
            if rank == 0 {
                println!("ok  {name:<24} loss {:.12} (single process {:.12})", got.loss, want.loss);
            }
        } else {
            eprintln!("rank {rank} {name}: {}", bad.join("; "));
            failures += 1;
        }
    }
    // Errors reach every rank: a slice that does not tile the vocabulary, and a gradient of
    // the wrong length on rank 0 only.
    let bad_start = if rank == p - 1 && p > 1 { start + 1 } else { start };
    let (mut dh, mut dw) = (vec![0.0f32; n * d], vec![0.0f32; len * d]);
    let short = if rank == 0 { 1 } else { 0 };
    for (what, vs, dw_len) in [("mis-tiled", bad_start, len * d), ("short dW on rank 0", start, len * d - short)] {
        if what == "mis-tiled" && p == 1 {
            continue;
        }
        let e = vocab_parallel_linear_cross_entropy(
            world,
            LinearShape { n, d, v: len },
            LinearInputs { h: &h, w: &w[start * d..(start + len) * d], bias: None, targets: &y },
            vs,
            LinearGrads { dh: Some(&mut dh), dw: Some(&mut dw[..dw_len]), dbias: None },
            RowOutputs::default(),
            None,
            &base,
        );
        if e.is_ok() {
            eprintln!("rank {rank}: linear, {what}: accepted");
            failures += 1;
        }
    }
    failures
}

/// Vocabulary-parallel sampling against `sample` on the whole rows: the same tokens, exactly.
fn check_sampling<C: Communicator>(world: &C, rank: usize, p: usize) -> i32 {
    let (rows, v) = (16usize, 1000usize);
    let mut rng = Rng(23);
    let mut z: Vec<f32> = (0..rows * v).map(|_| ((rng.next() - 0.5) * 10.0) as f32).collect();
    // Ties at the top and across slices, masked tokens, a row that is nearly flat.
    for r in 0..rows {
        z[r * v + 10] = 6.0;
        z[r * v + 990] = 6.0;
        z[r * v + 500 + r] = f32::NEG_INFINITY;
    }
    for j in 0..v {
        z[7 * v + j] = (j % 3) as f32 * 0.01;
    }
    z[9 * v + 333] = 40.0;
    let (start, len) = slice(v, p, rank);
    let shard: Vec<f32> = (0..rows).flat_map(|r| z[r * v + start..r * v + start + len].to_vec()).collect();
    let seeds: Vec<u64> = (0..rows as u64).map(|r| 1000 + r).collect();
    let uniforms: Vec<f64> = (0..rows).map(|_| rng.next()).collect();
    let base = SampleOptions::default();
    let cases: Vec<(&str, SampleOptions)> = vec![
        ("sample: top-k 5", base.top_k(5)),
        ("sample: top-k 5 strict", base.top_k(5).strict_top_k(true)),
        ("sample: top-k 1", base.top_k(1)),
        ("sample: top-k 50, top-p 0.9", base.top_k(50).top_p(0.9)),
        ("sample: top-k 40, min-p 0.05", base.top_k(40).min_p(0.05)),
        ("sample: min-p 0.1, T 0.7", base.min_p(0.1).temperature(0.7)),
        ("sample: top-p 0.8", base.top_p(0.8)),
        ("sample: plain, T 1.3", base.temperature(1.3)),
        ("sample: greedy", base.temperature(0.0)),
        ("sample: top-k > V", base.top_k(5000)),
    ];
    let mut failures = 0;
    for (name, o) in &cases {
        for (dname, draw) in
            [("counter", Draw::Counter { seeds: &seeds, step: 7 }), ("uniform", Draw::Uniform(&uniforms))]
        {
            let mut want = vec![0u32; rows];
            let ws =
                sample(View::rows(&z, rows, v).unwrap(), draw, &mut want, None::<(ViewMut<'_, f32>, _)>, o).unwrap();
            let mut got = vec![0u32; rows];
            let gs =
                vocab_parallel_sample(world, View::rows(&shard, rows, len).unwrap(), start, draw, &mut got, o).unwrap();
            let bits: Vec<u64> = got.iter().map(|&t| t as u64).collect();
            if got != want || gs != ws || !same_everywhere(world, &bits) {
                eprintln!("rank {rank} {name} ({dname}): tokens {got:?} vs {want:?}, stats {gs:?} vs {ws:?}");
                failures += 1;
            } else if rank == 0 && dname == "counter" {
                println!("ok  {name:<28} tokens {:?}...", &got[..6]);
            }
        }
    }
    // A NaN logit on the last rank: the same error, with its global index, on every rank.
    let mut bad_shard = shard.clone();
    if rank == p - 1 {
        bad_shard[2 * len + len - 1] = f32::NAN;
    }
    let mut t = vec![0u32; rows];
    let e = vocab_parallel_sample(
        world,
        View::rows(&bad_shard, rows, len).unwrap(),
        start,
        Draw::Counter { seeds: &seeds, step: 0 },
        &mut t,
        &base.top_k(3),
    );
    if !matches!(e, Err(smax::Error::NonFiniteLogit { row: 2, index, .. }) if index == v - 1) {
        eprintln!("rank {rank}: NaN logit gave {e:?}");
        failures += 1;
    }
    // A slice that does not tile the vocabulary, and tokens of the wrong length on rank 0 only.
    let bad_start = if rank == p - 1 && p > 1 { start + 1 } else { start };
    let mut t_short = vec![0u32; if rank == 0 { rows - 1 } else { rows }];
    let draw = Draw::Counter { seeds: &seeds, step: 0 };
    let e1 =
        vocab_parallel_sample(world, View::rows(&shard, rows, len).unwrap(), bad_start, draw, &mut t, &base.top_k(3));
    let e2 =
        vocab_parallel_sample(world, View::rows(&shard, rows, len).unwrap(), start, draw, &mut t_short, &base.top_k(3));
    if (p > 1 && e1.is_ok()) || e2.is_ok() {
        eprintln!("rank {rank}: sampling accepted a mis-tiled vocabulary or short tokens");
        failures += 1;
    }
    failures
}

/// Time of the sharded op (each rank its slice) against the single-process op on rank 0, and
/// the bytes each rank exchanges (the all-gathers of per-row scalars).
fn bench<C: Communicator>(world: &C, rank: usize, p: usize) {
    let (rows, v) = (4096usize, 32768usize);
    let (start, len) = slice(v, p, rank);
    let mut rng = Rng(11 + rank as u64);
    let shard: Vec<f32> = (0..rows * len).map(|_| ((rng.next() - 0.5) * 8.0) as f32).collect();
    let y: Vec<i64> = (0..rows).map(|r| ((r * 7919) % v) as i64).collect();
    let mut g = vec![0.0f32; rows * len];
    let o = CrossEntropyOptions::default();
    let mut times = Vec::new();
    for _ in 0..5 {
        world.barrier();
        let t0 = std::time::Instant::now();
        vocab_parallel_cross_entropy(
            world,
            View::rows(&shard, rows, len).unwrap(),
            start,
            &y,
            Some(ViewMut::rows(&mut g, rows, len).unwrap()),
            RowOutputs::default(),
            &o,
        )
        .unwrap();
        world.barrier();
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    if rank == 0 {
        // The single-process op on the whole matrix, for the ratio.
        let full: Vec<f32> = (0..rows * v).map(|_| ((rng.next() - 0.5) * 8.0) as f32).collect();
        let mut gf = vec![0.0f32; rows * v];
        let mut single = Vec::new();
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            cross_entropy(
                View::rows(&full, rows, v).unwrap(),
                Targets::Classes(&y),
                Some(ViewMut::rows(&mut gf, rows, v).unwrap()),
                RowOutputs::default(),
                &o,
            )
            .unwrap();
            single.push(t0.elapsed().as_secs_f64());
        }
        single.sort_by(f64::total_cmp);
        let exchanged = (4 + rows * 3) * 8 * p; // received per rank, both all-gathers
        println!(
            "vocab-parallel CE {rows} x {v} f32 on {p} rank(s): median {:.1} ms (single-process cross_entropy {:.1} ms), {:.2} MB received per rank",
            times[2] * 1e3,
            single[2] * 1e3,
            exchanged as f64 / 1e6
        );
    }
    bench_linear(world, rank, p);
    bench_sample(world, rank, p);
}

/// Time of the vocabulary-parallel linear cross-entropy (each rank its slice of `W`) against
/// the single-process op on rank 0, loss and all three gradients.
fn bench_linear<C: Communicator>(world: &C, rank: usize, p: usize) {
    let (n, d, v) = (2048usize, 512usize, 32768usize);
    let (start, len) = slice(v, p, rank);
    let mut rng = Rng(5);
    let h: Vec<f32> = (0..n * d).map(|_| (rng.next() - 0.5) as f32).collect();
    let y: Vec<i64> = (0..n).map(|r| ((r * 7919) % v) as i64).collect();
    let mut rng = Rng(6 + rank as u64);
    let w: Vec<f32> = (0..len * d).map(|_| ((rng.next() - 0.5) * 0.2) as f32).collect();
    let (mut dh, mut dw) = (vec![0.0f32; n * d], vec![0.0f32; len * d]);
    let o = LinearCrossEntropyOptions::default();
    let mut times = Vec::new();
    for _ in 0..3 {
        world.barrier();
        let t0 = std::time::Instant::now();
        vocab_parallel_linear_cross_entropy(
            world,
            LinearShape { n, d, v: len },
            LinearInputs { h: &h, w: &w, bias: None, targets: &y },
            start,
            LinearGrads { dh: Some(&mut dh), dw: Some(&mut dw), dbias: None },
            RowOutputs::default(),
            None,
            &o,
        )
        .unwrap();
        world.barrier();
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    if rank == 0 {
        let wf: Vec<f32> = (0..v * d).map(|_| ((rng.next() - 0.5) * 0.2) as f32).collect();
        let mut dwf = vec![0.0f32; v * d];
        let mut single = Vec::new();
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            linear_cross_entropy(
                LinearShape { n, d, v },
                LinearInputs { h: &h, w: &wf, bias: None, targets: &y },
                LinearGrads { dh: Some(&mut dh), dw: Some(&mut dwf), dbias: None },
                RowOutputs::default(),
                None,
                &o,
            )
            .unwrap();
            single.push(t0.elapsed().as_secs_f64());
        }
        single.sort_by(f64::total_cmp);
        // Received per rank: the rows' all-gather (1 + 3n f64 per rank) and dh's (n·d f32 per rank).
        let exchanged = ((1 + 3 * n) * 8 + n * d * 4) * p;
        println!(
            "vocab-parallel linear CE n {n} d {d} V {v} on {p} rank(s): median {:.1} ms (single-process linear_cross_entropy {:.1} ms), {:.2} MB received per rank",
            times[1] * 1e3,
            single[1] * 1e3,
            exchanged as f64 / 1e6
        );
    }
}

/// Time of the vocabulary-parallel sampler (top-k 50, then top-p 0.9) against `sample` on the
/// whole rows on rank 0, V = 131072, 64 rows.
fn bench_sample<C: Communicator>(world: &C, rank: usize, p: usize) {
    let (rows, v) = (64usize, 131072usize);
    let (start, len) = slice(v, p, rank);
    let mut rng = Rng(31);
    let z: Vec<f32> = (0..rows * v).map(|_| ((rng.next() - 0.5) * 16.0) as f32).collect();
    let shard: Vec<f32> = (0..rows).flat_map(|r| z[r * v + start..r * v + start + len].to_vec()).collect();
    let seeds: Vec<u64> = (0..rows as u64).collect();
    let o = SampleOptions::default().top_k(50).top_p(0.9);
    let mut tokens = vec![0u32; rows];
    let mut times = Vec::new();
    for step in 0..7 {
        world.barrier();
        let t0 = std::time::Instant::now();
        let draw = Draw::Counter { seeds: &seeds, step };
        vocab_parallel_sample(world, View::rows(&shard, rows, len).unwrap(), start, draw, &mut tokens, &o).unwrap();
        world.barrier();
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    if rank == 0 {
        let mut single = Vec::new();
        for step in 0..7 {
            let t0 = std::time::Instant::now();
            let draw = Draw::Counter { seeds: &seeds, step };
            sample(View::rows(&z, rows, v).unwrap(), draw, &mut tokens, None::<(ViewMut<'_, f32>, _)>, &o).unwrap();
            single.push(t0.elapsed().as_secs_f64());
        }
        single.sort_by(f64::total_cmp);
        // Received per rank: the meta rounds (4 f64 per row and rank), the counts, and at most
        // k + ties candidates (2 f64 each) per row and rank.
        let exchanged = (rows * 4 * 8 + rows * 4 + rows * 50 * 16) * p;
        println!(
            "vocab-parallel sample {rows} x {v} top-k 50 top-p 0.9 on {p} rank(s): median {:.2} ms (single-process sample {:.2} ms), about {:.2} MB received per rank",
            times[3] * 1e3,
            single[3] * 1e3,
            exchanged as f64 / 1e6
        );
    }
}
