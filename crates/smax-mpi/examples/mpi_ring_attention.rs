//! Ring (context-parallel) attention checked against single-process attention on every rank:
//! `mpirun -n 4 target/release/examples/mpi_ring_attention` (add `--allow-run-as-root
//! --oversubscribe` as root or with more ranks than cores). Each rank holds an uneven chunk
//! of the sequence (its queries, keys and values, read in place from strided views of the
//! whole tensors that every rank generates from one seed); for each mask and option set, its
//! rows of the output and log-sum-exp and its gradients must match `smax::attention` on the
//! whole sequence. Exits 1 on any mismatch. `--bench` times the forward and backward against
//! the single-process calls at sequence 8192, d = 128.

use mpi::traits::{Communicator, CommunicatorCollectives};
use smax::attention::{
    AttentionGrads, AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, HeadStrides, Heads,
    QueryPositions, Window, attention, attention_backward,
};
use smax_mpi::{RingLayout, ring_attention, ring_attention_backward};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Rank `rank`'s chunk `[start, start + len)` of `n` tokens among `p` ranks: uneven, the
/// later ranks longer (one rank may hold none when `n < p`).
fn chunk(n: usize, p: usize, rank: usize) -> (usize, usize) {
    let cut = |r: usize| (r * r + r) * n / (p * p + p);
    (cut(rank), cut(rank + 1) - cut(rank))
}

/// Rank `rank`'s runs `(start, len)` of `n` tokens: one uneven chunk ([`chunk`]) for the
/// contiguous layout; for zigzag, chunks `rank` and `2p − 1 − rank` of `2p` as even as
/// possible (the first `n mod 2p` one longer), as the layout defines them.
fn segments(layout: RingLayout, n: usize, p: usize, rank: usize) -> Vec<(usize, usize)> {
    match layout {
        RingLayout::Contiguous => vec![chunk(n, p, rank)],
        RingLayout::Zigzag => {
            let len = |i: usize| n / (2 * p) + usize::from(i < n % (2 * p));
            let start = |i: usize| (0..i).map(len).sum::<usize>();
            vec![(start(rank), len(rank)), (start(2 * p - 1 - rank), len(2 * p - 1 - rank))]
        }
    }
}

fn main() {
    let universe = mpi::initialize().expect("MPI init");
    let world = universe.world();
    let (rank, p) = (world.rank() as usize, world.size() as usize);
    if std::env::args().any(|a| a == "--bench") {
        bench(&world, rank, p);
        return;
    }
    let (b, hq, hk, d) = (2usize, 4usize, 2usize, 16usize);
    let mut failures = 0;
    let cases: Vec<(&str, usize, usize, AttentionOptions)> = vec![
        ("full", 45, 45, AttentionOptions::default()),
        ("causal", 45, 45, AttentionOptions::default().causal(true)),
        ("causal, window 7", 45, 45, AttentionOptions::default().causal(true).window(Window { left: 6, right: 0 })),
        ("window 5 both sides", 45, 45, AttentionOptions::default().window(Window { left: 5, right: 5 })),
        ("softcap, temperature", 45, 45, AttentionOptions::default().causal(true).softcap(3.0).temperature(0.8)),
        ("causal, 30 queries, 61 keys", 30, 61, AttentionOptions::default().causal(true)),
        ("offset -3, causal", 40, 40, AttentionOptions::default().causal(true).positions(QueryPositions::Offset(-3))),
        ("scale 0.5", 40, 40, AttentionOptions::default().scale(0.5)),
    ];
    for (name, ql, kl, o) in &cases {
        let (ql, kl) = (*ql, *kl);
        let mut rng = Rng(99);
        let q = rng.vec(b * hq * ql * d, 1.5);
        let k = rng.vec(b * hk * kl * d, 1.5);
        let v = rng.vec(b * hk * kl * d, 2.0);
        let dout = rng.vec(b * hq * ql * d, 1.0);
        // The single-process reference on the whole sequence.
        let full = AttentionShape::new(b, hq, ql, kl, d).kv_heads(hk);
        let inputs = AttentionInputs::new(full, Heads::new(&q), Heads::new(&k), Heads::new(&v));
        let (mut o_ref, mut l_ref) = (vec![0.0f32; full.out_len()], vec![0.0f32; full.lse_len()]);
        attention(inputs, AttentionOutputs::new(&mut o_ref, Some(&mut l_ref)), o).unwrap();
        let (mut dq_ref, mut dk_ref, mut dv_ref) =
            (vec![0.0f32; full.out_len()], vec![0.0f32; full.kv_len_elems()], vec![0.0f32; full.kv_len_elems()]);
        let grads = AttentionGrads::new(&mut dq_ref, &mut dk_ref, &mut dv_ref);
        attention_backward(inputs, &o_ref, &l_ref, &dout, grads, o).unwrap();
        for layout in [RingLayout::Contiguous, RingLayout::Zigzag] {
            let ro = o.with_variant(layout);
            // This rank's token runs `(start, len)` of the queries and of the keys.
            let (qseg, kseg) = (segments(layout, ql, p, rank), segments(layout, kl, p, rank));
            let (qn, kn): (usize, usize) = (qseg.iter().map(|g| g.1).sum(), kseg.iter().map(|g| g.1).sum());
            let local = AttentionShape::new(b, hq, qn, kn, d).kv_heads(hk);
            // Rows of `x` (`[b·h, n, w]`) at the runs, contiguous.
            let take = |x: &[f32], h: usize, n: usize, w: usize, runs: &[(usize, usize)]| -> Vec<f32> {
                (0..b * h)
                    .flat_map(|bh| {
                        runs.iter().flat_map(move |&(a, l)| x[(bh * n + a) * w..(bh * n + a + l) * w].to_vec())
                    })
                    .collect()
            };
            // Contiguous: read in place through strides; zigzag: the two runs copied together.
            let (ql_, kl_, vl_) = (take(&q, hq, ql, d, &qseg), take(&k, hk, kl, d, &kseg), take(&v, hk, kl, d, &kseg));
            let li = match layout {
                RingLayout::Contiguous => AttentionInputs::new(
                    local,
                    Heads::strided(&q[qseg[0].0 * d..], HeadStrides::bhsd(hq, ql, d)),
                    Heads::strided(&k[kseg[0].0 * d..], HeadStrides::bhsd(hk, kl, d)),
                    Heads::strided(&v[kseg[0].0 * d..], HeadStrides::bhsd(hk, kl, d)),
                ),
                RingLayout::Zigzag => AttentionInputs::new(local, Heads::new(&ql_), Heads::new(&kl_), Heads::new(&vl_)),
            };
            let (mut out, mut lse) = (vec![0.0f32; local.out_len()], vec![0.0f32; local.lse_len()]);
            ring_attention(&world, li, AttentionOutputs::new(&mut out, Some(&mut lse)), &ro).unwrap();
            let dout_l = take(&dout, hq, ql, d, &qseg);
            let (mut dq, mut dk, mut dv) =
                (vec![0.0f32; local.out_len()], vec![0.0f32; local.kv_len_elems()], vec![0.0f32; local.kv_len_elems()]);
            let grads = AttentionGrads::new(&mut dq, &mut dk, &mut dv);
            ring_attention_backward(&world, li, &out, &lse, &dout_l, grads, &ro).unwrap();
            let vmax = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let mut bad = Vec::new();
            let o_want = take(&o_ref, hq, ql, d, &qseg);
            if let Some(i) = (0..out.len()).find(|&i| (out[i] - o_want[i]).abs() > 1e-5 * (1.0 + vmax)) {
                bad.push(format!("out[{i}] {} vs {}", out[i], o_want[i]));
            }
            let l_want = take(&l_ref, hq, ql, 1, &qseg);
            if let Some(i) = (0..lse.len())
                .find(|&i| !(lse[i] == l_want[i] || (lse[i] - l_want[i]).abs() <= 1e-5 * (1.0 + l_want[i].abs())))
            {
                bad.push(format!("lse[{i}] {} vs {}", lse[i], l_want[i]));
            }
            for (what, got, want, h, n, runs) in [
                ("dq", &dq, &dq_ref, hq, ql, &qseg),
                ("dk", &dk, &dk_ref, hk, kl, &kseg),
                ("dv", &dv, &dv_ref, hk, kl, &kseg),
            ] {
                let want_l = take(want, h, n, d, runs);
                let gmax = want.iter().fold(1e-30f32, |m, x| m.max(x.abs()));
                if let Some(i) = (0..got.len()).find(|&i| (got[i] - want_l[i]).abs() > 2e-5 * gmax) {
                    bad.push(format!("{what}[{i}] {} vs {}", got[i], want_l[i]));
                }
            }
            if bad.is_empty() {
                if rank == 0 {
                    println!("ok  {name:<28} {layout:?} ({ql} queries, {kl} keys over {p} rank(s))");
                }
            } else {
                eprintln!("rank {rank} {name} {layout:?}: {}", bad.join("; "));
                failures += 1;
            }
        }
    }
    // A bias is not sharded: refused on every rank.
    let s = AttentionShape::new(1, 1, 2, 2, 4);
    let z = [0.0f32; 8];
    let bias = [0.0f32; 4];
    let o = AttentionOptions::default()
        .bias(smax::attention::ScoreBias { data: &bias, strides: smax::attention::ScoreStrides::shared(2) });
    let mut out = [0.0f32; 8];
    let r = ring_attention(
        &world,
        AttentionInputs::new(s, Heads::new(&z), Heads::new(&z), Heads::new(&z)),
        AttentionOutputs::new(&mut out, None),
        &o,
    );
    if r.is_ok() {
        eprintln!("rank {rank}: a score bias was accepted");
        failures += 1;
    }
    // An output of the wrong length on rank 0 only: an error on every rank, none left waiting.
    let n_out = if rank == 0 { 7 } else { 8 };
    let r = ring_attention(
        &world,
        AttentionInputs::new(s, Heads::new(&z), Heads::new(&z), Heads::new(&z)),
        AttentionOutputs::new(&mut out[..n_out], None),
        &AttentionOptions::default(),
    );
    if r.is_ok() {
        eprintln!("rank {rank}: an output of the wrong length (on rank 0) was accepted");
        failures += 1;
    }
    let mut total = 0i32;
    world.all_reduce_into(&failures, &mut total, mpi::collective::SystemOperation::sum());
    if rank == 0 {
        println!(
            "{p} ranks: {}",
            if total == 0 { "all ring attention checks passed".to_string() } else { format!("{total} failures") }
        );
    }
    if total != 0 {
        std::process::exit(1);
    }
}

/// Median time of ring attention's forward and backward (each rank its part, both layouts)
/// against the single-process calls on rank 0 at the whole sequence, causal, batch 1, 8 heads,
/// d = 128, sequence 8192 (a multiple of 2P for P up to 8, so every rank holds `8192/P`
/// tokens in either layout).
fn bench<C: Communicator>(world: &C, rank: usize, p: usize) {
    let (h, d, n) = (8usize, 128usize, 8192usize);
    let len = n / p;
    let local = AttentionShape::new(1, h, len, len, d);
    let mut rng = Rng(5 + rank as u64);
    let (q, k, v) = (rng.vec(local.out_len(), 1.0), rng.vec(local.out_len(), 1.0), rng.vec(local.out_len(), 1.0));
    let dout = rng.vec(local.out_len(), 1.0);
    let o = AttentionOptions::default().causal(true);
    let li = AttentionInputs::new(local, Heads::new(&q), Heads::new(&k), Heads::new(&v));
    let (mut out, mut lse) = (vec![0.0f32; local.out_len()], vec![0.0f32; local.lse_len()]);
    let (mut dq, mut dk, mut dv) =
        (vec![0.0f32; local.out_len()], vec![0.0f32; local.out_len()], vec![0.0f32; local.out_len()]);
    let mut lines = Vec::new();
    for layout in [RingLayout::Contiguous, RingLayout::Zigzag] {
        let ro = o.with_variant(layout);
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            world.barrier();
            let t0 = std::time::Instant::now();
            ring_attention(world, li, AttentionOutputs::new(&mut out, Some(&mut lse)), &ro).unwrap();
            world.barrier();
            let t1 = std::time::Instant::now();
            let grads = AttentionGrads::new(&mut dq, &mut dk, &mut dv);
            ring_attention_backward(world, li, &out, &lse, &dout, grads, &ro).unwrap();
            world.barrier();
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push(t1.elapsed().as_secs_f64());
        }
        fwd.sort_by(f64::total_cmp);
        bwd.sort_by(f64::total_cmp);
        lines.push(format!("{layout:?}: forward {:.1} ms, backward {:.1} ms", fwd[1] * 1e3, bwd[1] * 1e3));
    }
    if rank == 0 {
        let full = AttentionShape::new(1, h, n, n, d);
        let (q, k, v) = (rng.vec(full.out_len(), 1.0), rng.vec(full.out_len(), 1.0), rng.vec(full.out_len(), 1.0));
        let dout = rng.vec(full.out_len(), 1.0);
        let fi = AttentionInputs::new(full, Heads::new(&q), Heads::new(&k), Heads::new(&v));
        let (mut out, mut lse) = (vec![0.0f32; full.out_len()], vec![0.0f32; full.lse_len()]);
        let (mut dq, mut dk, mut dv) =
            (vec![0.0f32; full.out_len()], vec![0.0f32; full.out_len()], vec![0.0f32; full.out_len()]);
        let (mut sf, mut sb) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            attention(fi, AttentionOutputs::new(&mut out, Some(&mut lse)), &o).unwrap();
            let t1 = std::time::Instant::now();
            attention_backward(fi, &out, &lse, &dout, AttentionGrads::new(&mut dq, &mut dk, &mut dv), &o).unwrap();
            sf.push((t1 - t0).as_secs_f64());
            sb.push(t1.elapsed().as_secs_f64());
        }
        sf.sort_by(f64::total_cmp);
        sb.sort_by(f64::total_cmp);
        // Each rank sends its K/V part P − 1 times forward; backward adds the gradients' P sends.
        let kv_bytes = 2 * h * len * d * 4;
        println!(
            "ring attention causal, seq {n}, {h} heads, d {d}, {p} rank(s): {}; single process {:.1} / {:.1} ms; \
             sent per rank {:.1} MB forward, {:.1} MB backward",
            lines.join("; "),
            sf[1] * 1e3,
            sb[1] * 1e3,
            (kv_bytes * (p - 1)) as f64 / 1e6,
            (if p > 1 { kv_bytes * (2 * p - 1) } else { 0 }) as f64 / 1e6,
        );
    }
}
