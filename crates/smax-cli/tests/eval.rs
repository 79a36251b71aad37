//! `smax eval` end to end: the tests write logits and labels in every format the command
//! reads, run the binary, and compare its JSON with figures computed here in f64 from the
//! same values (an independent reference: plain loops, a golden-section search for the
//! temperature, pairwise AUROC).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use half::{bf16, f16};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next().max(1e-300), self.next());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("smax-eval-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An `.npy` image: version 1 header padded to 64 bytes.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend((h.len() as u16).to_le_bytes());
    v.extend(h.as_bytes());
    v.extend(data);
    v
}

fn f32_bytes(x: &[f64]) -> Vec<u8> {
    x.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect()
}
fn f16_bytes(x: &[f64]) -> Vec<u8> {
    x.iter().flat_map(|&v| f16::from_f64(v).to_le_bytes()).collect()
}
fn bf16_bytes(x: &[f64]) -> Vec<u8> {
    x.iter().flat_map(|&v| bf16::from_f64(v).to_le_bytes()).collect()
}
fn i64_bytes(y: &[i64]) -> Vec<u8> {
    y.iter().flat_map(|&v| v.to_le_bytes()).collect()
}

fn npz(path: &Path, entries: &[(&str, Vec<u8>)], deflate: bool) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let method = if deflate { zip::CompressionMethod::DEFLATE } else { zip::CompressionMethod::Stored };
    for (name, bytes) in entries {
        z.start_file(format!("{name}.npy"), zip::write::SimpleFileOptions::default().compression_method(method))
            .unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

fn safetensors(path: &Path, entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let (mut head, mut data) = (Vec::<String>::new(), Vec::<u8>::new());
    for (name, dt, shape, bytes) in entries {
        let s: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        head.push(format!(
            "\"{name}\": {{\"dtype\": \"{dt}\", \"shape\": [{}], \"data_offsets\": [{}, {}]}}",
            s.join(", "),
            data.len(),
            data.len() + bytes.len()
        ));
        data.extend(bytes);
    }
    let mut h = format!("{{\"__metadata__\": {{\"format\": \"pt\"}}, {}}}", head.join(", "));
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend(h.as_bytes());
    v.extend(data);
    std::fs::write(path, v).unwrap();
}

fn smax(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_smax")).arg("eval").args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

fn run_json(args: &[&str], out: &Path) -> serde_json::Value {
    let mut a: Vec<&str> = args.to_vec();
    let o = out.to_str().unwrap();
    a.extend(["--json", o]);
    let (ok, stdout, stderr) = smax(&a);
    assert!(ok, "smax eval {args:?} failed:\n{stdout}\n{stderr}");
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

/// The f64 reference of every figure at temperature `t`.
struct Ref {
    n: usize,
    top1: f64,
    topk: f64,
    nll: f64,
    brier: f64,
    ece: f64,
    mce: f64,
    counts: Vec<usize>,
}

fn reference(z: &[f64], y: &[i64], c: usize, t: f64, k: usize, m: usize) -> Ref {
    let (mut n, mut top1, mut topk, mut nll, mut brier) = (0, 0.0, 0.0, 0.0, 0.0);
    let mut bins = vec![(0usize, 0.0f64, 0.0f64); m];
    for (row, &l) in z.chunks(c).zip(y) {
        if l == -100 || row.iter().any(|v| !v.is_finite()) {
            continue;
        }
        n += 1;
        let s: Vec<f64> = row.iter().map(|v| v / t).collect();
        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + s.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
        let p: Vec<f64> = s.iter().map(|v| (v - lse).exp()).collect();
        let am = (0..c).fold(0, |a, i| if row[i] > row[a] { i } else { a });
        let l = l as usize;
        let better = (0..c).filter(|&i| row[i] > row[l] || (row[i] == row[l] && i < l)).count();
        top1 += (am == l) as u8 as f64;
        topk += (better < k) as u8 as f64;
        nll += lse - s[l];
        brier += (0..c).map(|i| (p[i] - (i == l) as u8 as f64).powi(2)).sum::<f64>();
        let conf = p[am];
        // Bins (k/m, (k+1)/m], the first also taking 0.
        let b = (1..=m).find(|&b| conf <= b as f64 / m as f64).unwrap_or(m) - 1;
        bins[b].0 += 1;
        bins[b].1 += (am == l) as u8 as f64;
        bins[b].2 += conf;
    }
    let nf = n as f64;
    let (mut ece, mut mce) = (0.0, 0.0f64);
    for &(cnt, cor, cf) in bins.iter().filter(|b| b.0 > 0) {
        let gap = (cor / cnt as f64 - cf / cnt as f64).abs();
        ece += cnt as f64 / nf * gap;
        mce = mce.max(gap);
    }
    Ref {
        n,
        top1: top1 / nf,
        topk: topk / nf,
        nll: nll / nf,
        brier: brier / nf,
        ece,
        mce,
        counts: bins.iter().map(|b| b.0).collect(),
    }
}

/// Logits of a noisy classifier: the label's logit raised by `signal`, then scaled.
fn classifier(rng: &mut Rng, rows: usize, c: usize, signal: f64, scale: f64) -> (Vec<f64>, Vec<i64>) {
    let mut z = Vec::with_capacity(rows * c);
    let mut y = Vec::with_capacity(rows);
    for _ in 0..rows {
        let l = (rng.next() * c as f64) as usize % c;
        for i in 0..c {
            z.push(scale * (rng.normal() + if i == l { signal } else { 0.0 }));
        }
        y.push(l as i64);
    }
    (z, y)
}

fn close(got: &serde_json::Value, want: f64, tol: f64, what: &str) {
    let g = got.as_f64().unwrap_or_else(|| panic!("{what}: {got}"));
    assert!((g - want).abs() <= tol * (1.0 + want.abs()), "{what}: {g} vs {want}");
}

fn check(m: &serde_json::Value, r: &Ref, tol: f64) {
    assert_eq!(m["n"].as_u64().unwrap() as usize, r.n);
    close(&m["top1"], r.top1, 1e-12, "top1");
    close(&m["topk"], r.topk, 1e-12, "topk");
    close(&m["nll"], r.nll, tol, "nll");
    close(&m["brier"], r.brier, tol, "brier");
    close(&m["ece"], r.ece, tol, "ece");
    close(&m["mce"], r.mce, tol, "mce");
    let counts: Vec<usize> =
        m["bins"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap() as usize).collect();
    assert_eq!(counts, r.counts);
}

#[test]
fn npy_f32_matches_the_f64_reference_across_chunks_and_temperatures() {
    let d = dir("npy");
    let mut rng = Rng(1);
    let (c, rows) = (37, 901);
    let (z, y) = classifier(&mut rng, rows, c, 2.5, 1.7);
    // f32 is what the command reads: the reference uses the same rounded values.
    let z: Vec<f64> = z.iter().map(|&v| v as f32 as f64).collect();
    std::fs::write(d.join("z.npy"), npy("<f4", &[rows, c], &f32_bytes(&z))).unwrap();
    std::fs::write(d.join("y.npy"), npy("<i8", &[rows], &i64_bytes(&y))).unwrap();
    let (zp, yp) = (d.join("z.npy"), d.join("y.npy"));
    for (t, chunk) in [("1", "1000"), ("1", "37"), ("2.5", "64"), ("0.4", "5")] {
        let j = run_json(
            &[zp.to_str().unwrap(), "--labels", yp.to_str().unwrap(), "--temperature", t, "--chunk-rows", chunk],
            &d.join("out.json"),
        );
        let r = reference(&z, &y, c, t.parse().unwrap(), 5, 15);
        check(&j["metrics"], &r, 2e-6);
        close(&j["metrics"]["perplexity"], r.nll.exp(), 2e-6, "perplexity");
    }
}

/// Golden-section search of the NLL over T in f64.
fn best_temperature(z: &[f64], y: &[i64], c: usize) -> f64 {
    let nll = |t: f64| reference(z, y, c, t, 1, 1).nll;
    let (mut a, mut b) = (0.05f64, 20.0f64);
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..200 {
        let (x1, x2) = (b - g * (b - a), a + g * (b - a));
        if nll(x1) < nll(x2) {
            b = x2;
        } else {
            a = x1;
        }
    }
    (a + b) / 2.0
}

#[test]
fn token_level_f16_npz_with_ignored_and_nan_rows_and_a_fitted_temperature() {
    let d = dir("npz");
    let mut rng = Rng(2);
    let (n, t, v) = (6, 50, 64);
    let (mut z, mut y) = classifier(&mut rng, n * t, v, 3.0, 2.0);
    for (i, l) in y.iter_mut().enumerate() {
        if i % 7 == 3 {
            *l = -100;
        }
    }
    z[11 * v + 5] = f64::NAN;
    let z: Vec<f64> = z.iter().map(|&x| f16::from_f64(x).to_f64()).collect();
    for deflate in [false, true] {
        let p = d.join(format!("tok{deflate}.npz"));
        npz(
            &p,
            &[("logits", npy("<f2", &[n, t, v], &f16_bytes(&z))), ("labels", npy("<i8", &[n, t], &i64_bytes(&y)))],
            deflate,
        );
        let p = p.to_str().unwrap();
        let j = run_json(
            &[p, "--key", "logits", "--labels-key", "labels", "--fit-temperature", "--chunk-rows", "33"],
            &d.join("o.json"),
        );
        let r = reference(&z, &y, v, 1.0, 5, 15);
        check(&j["metrics"], &r, 2e-6);
        assert_eq!(j["nonfinite"].as_u64(), Some(1));
        assert_eq!(j["ignored"].as_u64().unwrap() as usize, y.iter().filter(|&&l| l == -100).count());
        let tstar = best_temperature(&z, &y, v);
        let got = j["fit"]["temperature"].as_f64().unwrap();
        assert!((got - tstar).abs() < 1e-6 * tstar, "fitted {got} vs {tstar}");
        check(&j["fit"]["metrics"], &reference(&z, &y, v, got, 5, 15), 2e-6);
    }
}

#[test]
fn bf16_safetensors_ood_and_equal_mass_bins() {
    let d = dir("st");
    let mut rng = Rng(3);
    let c = 20;
    let (z, y) = classifier(&mut rng, 400, c, 3.0, 1.0);
    let (zo, _) = classifier(&mut rng, 300, c, 0.5, 1.0);
    let z: Vec<f64> = z.iter().map(|&x| bf16::from_f64(x).to_f64()).collect();
    let zo: Vec<f64> = zo.iter().map(|&x| bf16::from_f64(x).to_f64()).collect();
    let p = d.join("in.safetensors");
    safetensors(&p, &[("logits", "BF16", vec![400, c], bf16_bytes(&z)), ("y", "I64", vec![400], i64_bytes(&y))]);
    let po = d.join("out.safetensors");
    safetensors(&po, &[("logits", "BF16", vec![300, c], bf16_bytes(&zo))]);
    let j = run_json(
        &[
            p.to_str().unwrap(),
            "--key",
            "logits",
            "--labels-key",
            "y",
            "--ood",
            po.to_str().unwrap(),
            "--binning",
            "mass",
            "--bins",
            "10",
        ],
        &d.join("o.json"),
    );
    // Equal mass: 10 bins of 40.
    let bins = j["metrics"]["bins"].as_array().unwrap();
    assert_eq!(bins.len(), 10);
    assert!(bins.iter().all(|b| b["count"].as_u64() == Some(40)));
    // Scores in f64: MSP, max-logit, negative energy (T = 1).
    let scores = |z: &[f64]| -> Vec<[f64; 3]> {
        z.chunks(c)
            .map(|r| {
                let mx = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + r.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
                [(mx - lse).exp(), mx, lse]
            })
            .collect()
    };
    let (si, so) = (scores(&z), scores(&zo));
    for (k, name) in ["MSP", "max-logit", "energy"].iter().enumerate() {
        let (p, q): (Vec<f64>, Vec<f64>) = (si.iter().map(|s| s[k]).collect(), so.iter().map(|s| s[k]).collect());
        let mut wins = 0.0;
        for a in &p {
            for b in &q {
                wins += if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                };
            }
        }
        let auroc = wins / (p.len() * q.len()) as f64;
        let mut ps = p.clone();
        ps.sort_by(|a, b| b.total_cmp(a));
        let theta = ps[(0.95 * p.len() as f64).ceil() as usize - 1];
        let fpr = q.iter().filter(|&&s| s >= theta).count() as f64 / q.len() as f64;
        // The command's scores come from f32 arithmetic: pairs closer than that may swap.
        close(&j["ood"][name]["auroc"], auroc, 2e-3, name);
        close(&j["ood"][name]["fpr95"], fpr, 1e-2, name);
        assert!(auroc > 0.8, "{name}: {auroc}");
    }
}

#[test]
fn edge_confidences_land_in_the_bins_they_close() {
    let d = dir("edge");
    // Confidence exactly 1 (a gap of 200), exactly 1/2 (two equal logits), exactly 1/4.
    let p = d.join("e.npy");
    std::fs::write(
        &p,
        npy("<f4", &[3, 4], &f32_bytes(&[0.0, -200.0, -200.0, -200.0, 3.0, 3.0, -200.0, -200.0, 1.0, 1.0, 1.0, 1.0])),
    )
    .unwrap();
    let py = d.join("y.npy");
    std::fs::write(&py, npy("<i8", &[3], &i64_bytes(&[0, 0, 1]))).unwrap();
    let j = run_json(&[p.to_str().unwrap(), "--labels", py.to_str().unwrap(), "--bins", "4"], &d.join("o.json"));
    let counts: Vec<u64> =
        j["metrics"]["bins"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap()).collect();
    // 1 → last bin; 1/2 → (1/4, 1/2]; 1/4 → [0, 1/4].
    assert_eq!(counts, vec![1, 1, 0, 1]);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = dir("bad");
    let p = d.join("z.npy");
    std::fs::write(&p, npy("<f4", &[3, 4], &f32_bytes(&[0.0; 12]))).unwrap();
    let label = |y: &[i64]| {
        let py = d.join("y.npy");
        std::fs::write(&py, npy("<i8", &[y.len()], &i64_bytes(y))).unwrap();
        smax(&[p.to_str().unwrap(), "--labels", py.to_str().unwrap()])
    };
    let (ok, _, err) = label(&[0, 7, 1]);
    assert!(!ok && err.contains("label 7 of row 1"), "{err}");
    let (ok, _, err) = label(&[-100, -100, -100]);
    assert!(!ok && err.contains("nothing to evaluate"), "{err}");
    let (ok, _, err) = label(&[0, 1]);
    assert!(!ok && err.contains("do not match"), "{err}");
    std::fs::write(d.join("junk.npy"), b"not an array").unwrap();
    let (ok, _, err) = smax(&[d.join("junk.npy").to_str().unwrap()]);
    assert!(!ok && err.contains("not an .npy"), "{err}");
    // A header whose shape needs more bytes than the file has.
    std::fs::write(d.join("short.npy"), npy("<f4", &[1000, 1000], &f32_bytes(&[0.0; 4]))).unwrap();
    let (ok, _, err) = smax(&[d.join("short.npy").to_str().unwrap()]);
    assert!(!ok && err.contains("shorter"), "{err}");
    // A safetensors header whose offsets point past any file.
    let h =
        format!("{{\"x\": {{\"dtype\": \"F32\", \"shape\": [0, 4], \"data_offsets\": [{m}, {m}]}}}}", m = u64::MAX - 2);
    let mut st = (h.len() as u64).to_le_bytes().to_vec();
    st.extend(h.as_bytes());
    std::fs::write(d.join("far.safetensors"), st).unwrap();
    let (ok, _, err) = smax(&[d.join("far.safetensors").to_str().unwrap()]);
    assert!(!ok && err.contains("past any file"), "{err}");
    let (ok, _, err) = smax(&[p.to_str().unwrap(), "--temperature", "0"]);
    assert!(!ok && err.contains("temperature"), "{err}");
}

#[test]
fn plots_are_written_as_svg_and_png() {
    let d = dir("plot");
    let mut rng = Rng(4);
    let (z, y) = classifier(&mut rng, 300, 10, 2.0, 2.0);
    std::fs::write(d.join("z.npy"), npy("<f4", &[300, 10], &f32_bytes(&z))).unwrap();
    std::fs::write(d.join("y.npy"), npy("<i8", &[300], &i64_bytes(&y))).unwrap();
    for ext in ["svg", "png"] {
        let out = d.join(format!("r.{ext}"));
        let (ok, stdout, err) = smax(&[
            d.join("z.npy").to_str().unwrap(),
            "--labels",
            d.join("y.npy").to_str().unwrap(),
            "--fit-temperature",
            "--plot",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{stdout}{err}");
        let b = std::fs::read(&out).unwrap();
        if ext == "svg" {
            let s = String::from_utf8(b).unwrap();
            assert!(
                s.starts_with("<svg") && s.contains("AFTER TEMPERATURE SCALING") && s.matches("<rect").count() > 10
            );
        } else {
            assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
            assert_eq!(&b[12..16], b"IHDR");
            assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()), 880);
            assert_eq!(u32::from_be_bytes(b[20..24].try_into().unwrap()), 510);
        }
    }
}
