use smax::*;
fn main() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    for lvl in SimdLevel::available() {
        for alg in [Algorithm::ThreePass, Algorithm::TwoPass, Algorithm::Online] {
            let o = Options::default().simd(lvl).algorithm(alg);
            let y = softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &o).unwrap();
            let l = log_softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &o).unwrap();
            let s = logsumexp_to_vec(View::rows(&x, 1, 4).unwrap(), &o).unwrap();
            println!("{lvl:?} {alg:?} {y:?} {l:?} {s:?}");
        }
    }
    let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32) * 0.1).collect();
    let y = softmax_to_vec(View::rows(&x, 1, 1000).unwrap(), &Options::default()).unwrap();
    println!("sum {}", y.iter().map(|&v| v as f64).sum::<f64>());
}
