//! Vocabulary-parallel cross-entropy checked against the single-process op, on every rank:
//! `mpirun -n 4 target/release/examples/mpi_vocab_parallel` (add `--allow-run-as-root
//! --oversubscribe` as root or with more ranks than cores). Each rank holds an uneven slice
//! of a 37 x 1000 logit matrix; for each option set the loss, the row outputs and this rank's
//! gradient slice must match `smax::loss::cross_entropy` on the whole matrix, and the loss
//! must be bitwise the same on every rank. Exits 1 on any mismatch. `--bench` times the
//! sharded op against the single-process one at 4096 x 32768 and prints bytes exchanged.

use mpi::traits::{Communicator, CommunicatorCollectives};
use smax::loss::{AllIgnored, CrossEntropyOptions, Reduction, RowOutputs, Targets, cross_entropy};
use smax::{View, ViewMut};
use smax_mpi::vocab_parallel_cross_entropy;

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
    let mut y: Vec<i64> = (0..rows).map(|_| (rng.next() * v as f64) as i64 % v as i64).collect();
    y[4] = -100;
    y[9] = -100;
    let weights: Vec<f32> = (0..v).map(|k| 0.5 + (k % 7) as f32 * 0.25).collect();
    let (start, len) = slice(v, p, rank);
    let shard: Vec<f32> = (0..rows).flat_map(|r| z[r * v + start..r * v + start + len].to_vec()).collect();
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
        ("every row ignored", base, vec![-100; rows]),
        ("every row ignored, NaN", CrossEntropyOptions { all_ignored: AllIgnored::Nan, ..base }, vec![-100; rows]),
    ];
    let mut failures = 0;
    for (name, o, t) in &cases {
        let mut g_full = vec![0.0f32; rows * v];
        let (mut l_full, mut lse_full) = (vec![0.0f64; rows], vec![0.0f64; rows]);
        let want = cross_entropy(
            View::rows(&z, rows, v).unwrap(),
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
            View::rows(&shard, rows, len).unwrap(),
            start,
            t,
            Some(ViewMut::rows(&mut g, rows, len).unwrap()),
            RowOutputs { loss: Some(&mut l_rows), lse: Some(&mut lse), ..Default::default() },
            o,
        )
        .unwrap();
        let close = |a: f64, b: f64, tol: f64| (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * (1.0 + b.abs());
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
}
