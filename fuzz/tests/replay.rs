//! The fuzz corpus as a test: every checked-in input of `corpus/<target>/` (the minimised
//! corpus, crashes found and fixed included) runs through its target, and so does a fixed set
//! of generated inputs, on stable Rust without libFuzzer.

use std::path::Path;

/// Runs `target` on `data`; on a failure, saves the input (to copy into the corpus once fixed)
/// and fails naming the file.
fn run(name: &str, target: fn(&[u8]), data: &[u8]) {
    if std::panic::catch_unwind(|| target(data)).is_err() {
        let path = std::env::temp_dir().join(format!("smax-fuzz-{name}-failure.bin"));
        std::fs::write(&path, data).unwrap();
        panic!("target {name} failed on the input saved in {}", path.display());
    }
}

#[test]
fn corpus_replays_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut ran = 0;
    for (name, target) in smax_fuzz::TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(name)) else { continue };
        for entry in dir {
            let path = entry.unwrap().path();
            run(name, target, &std::fs::read(&path).unwrap());
            ran += 1;
        }
    }
    println!("replayed {ran} corpus inputs");
}

#[test]
fn generated_inputs_run_clean() {
    // xorshift64*: a fixed stream of byte strings of every length up to 256.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for (name, target) in smax_fuzz::TARGETS {
        for n in 0..600 {
            let len = n % 257;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            run(name, target, &data);
        }
    }
}
