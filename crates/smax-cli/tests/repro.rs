//! `smax repro NAME --preset tiny`: every reproduction runs, writes JSON, and its tiny run
//! shows the property its claim rests on (each check can fail).

use std::process::Command;

fn repro(name: &str) -> serde_json::Value {
    let out = std::env::temp_dir().join(format!("smax-repro-{}-{name}.json", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_smax"))
        .args(["repro", name, "--preset", "tiny", "--json", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{name}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(j["name"], name);
    assert!(!j["paper"].as_str().unwrap().is_empty() && !j["verdict"].as_str().unwrap().is_empty());
    assert!(
        j["tables"].as_array().unwrap().iter().all(|t| !t["rows"].as_array().unwrap().is_empty()),
        "{name}: empty table"
    );
    j
}

fn rows(j: &serde_json::Value, table: usize) -> Vec<serde_json::Value> {
    j["tables"][table]["rows"].as_array().unwrap().clone()
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[test]
fn list_names_every_reproduction() {
    let o = Command::new(env!("CARGO_BIN_EXE_smax")).args(["repro", "--list"]).output().unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    for n in [
        "two-pass",
        "grokking",
        "cce-memory",
        "clipped-softmax",
        "lssa-length",
        "unified-max",
        "decoupled-floor",
        "quantizers",
        "label-noise",
        "mahalanobis-ood",
    ] {
        assert!(s.contains(n), "{n} missing from --list");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_smax")).args(["repro", "nope"]).output().unwrap();
    assert!(!bad.status.success());
}

#[test]
fn two_pass_is_within_a_few_ulp() {
    for r in rows(&repro("two-pass"), 0) {
        assert!(num(&r["GB/s"]) > 0.0);
        assert!(num(&r["max ulp (normal outputs)"]) <= 8.0, "{r}");
    }
}

#[test]
fn grokking_memorises_the_training_set() {
    let j = repro("grokking");
    let last_softmax = rows(&j, 0).into_iter().rfind(|r| r["run"] == "softmax CE (f32)").unwrap();
    assert!(num(&last_softmax["train acc"]) >= 0.9, "{last_softmax}");
}

#[test]
fn cce_matches_the_materialized_path_in_less_memory() {
    let r = rows(&repro("cce-memory"), 0);
    let (m, f) = (&r[0], &r[1]);
    assert!((num(&m["loss"]) - num(&f["loss"])).abs() <= 1e-5 * num(&m["loss"]).abs());
    assert!(num(&f["max rel diff dh"]) < 1e-4 && num(&f["max rel diff dW"]) < 1e-4, "{f}");
    assert!(num(&f["peak extra MB"]) < num(&m["peak extra MB"]));
}

#[test]
fn clipped_softmax_zeros_at_the_analytic_gap() {
    let r = rows(&repro("clipped-softmax"), 0);
    for x in &r[..3] {
        assert!(num(&x["rel. diff"]).abs() < 1e-6, "{x}");
    }
    assert!(num(&r[3]["measured"]) > 80.0);
}

#[test]
fn lssar_concentrates_and_weights_sum_to_one() {
    let r = rows(&repro("lssa-length"), 0);
    for x in &r {
        assert!((num(&x["sum of weights"]) - 1.0).abs() < 1e-4, "{x}");
    }
    for n in r.chunks(4) {
        assert!(num(&n[3]["entropy/lnN"]) < num(&n[0]["entropy/lnN"]), "{n:?}");
    }
}

#[test]
fn unified_max_wide_window_needs_no_fallback() {
    let r = rows(&repro("unified-max"), 0);
    assert!(r[2]["fallback rows"].as_str().unwrap().starts_with("0 of"), "{r:?}");
}

#[test]
fn decoupled_loss_has_no_log_m_floor() {
    for x in rows(&repro("decoupled-floor"), 0) {
        assert!((num(&x["multi-positive softmax"]) - num(&x["ln m"])).abs() < 1e-4, "{x}");
        assert!(num(&x["decoupled"]) < 1e-3, "{x}");
    }
}

#[test]
fn quantizer_errors_fall_with_bits() {
    let r = rows(&repro("quantizers"), 0);
    for x in &r {
        for k in ["uniform", "log2", "log-sqrt2", "SULQ"] {
            assert!(num(&x[k]) > 0.0 && num(&x[k]).is_finite(), "{x}");
        }
    }
    assert!(num(&r[2]["uniform"]) < num(&r[0]["uniform"]));
}

#[test]
fn label_noise_runs_beat_chance() {
    for x in rows(&repro("label-noise"), 0) {
        for k in ["CE (tau 1)", "GCE q=0.7 (tau 1.7)", "MAE (tau 2)"] {
            assert!(num(&x[k]) > 0.3, "{x}");
        }
    }
}

#[test]
fn mahalanobis_separates_a_far_shift() {
    let r = rows(&repro("mahalanobis-ood"), 0);
    let far = r.iter().find(|x| num(&x["shift"]) == 2.0 && x["score"] == "Mahalanobis").unwrap();
    assert!(num(&far["AUROC"]) > 0.9, "{far}");
}
