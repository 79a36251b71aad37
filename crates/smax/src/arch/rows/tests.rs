use super::*;
use crate::arch::{SimdLevel, Task, dispatch};

/// What [`WritePass`] runs.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `write_row` without a next row.
    Write,
    /// The same fused with the online pass over the second input.
    WriteNext,
    /// `softmax_bwd` / `log_softmax_bwd`, the second input as the upstream gradient.
    Backward,
    /// `finish_max_next`, the max of the second input returned.
    FinishMaxNext,
}

/// One write pass over `x → y` (the softmax or the log-softmax form); returns the fused
/// next-row state (`WriteNext`; empty otherwise).
struct WritePass<'a> {
    kind: Kind,
    log: bool,
    stream: bool,
    io: (&'a [f32], &'a mut [f32]),
    other: &'a [f32],
}

impl Task for WritePass<'_> {
    type Output = (f32, f64);
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) -> (f32, f64) {
        let (m, k, c) = (0.75f32, 1.25f32, 0.3f32);
        let WritePass { kind, log, stream, io: (x, y), other } = self;
        let mut st = Online::EMPTY;
        let map = if log { RowMap::LogSoftmax { m, k, ls: c } } else { RowMap::Softmax { m, k, c } };
        match (kind, log) {
            (Kind::Write, _) => write_row(s, x, y, map, stream, Ahead::NONE, None),
            (Kind::WriteNext, _) => {
                let n = Next { x: other, k, st: &mut st, pf: Ahead::NONE };
                write_row(s, x, y, map, stream, Ahead::NONE, Some(n));
            }
            (Kind::Backward, false) => softmax_bwd(s, x, other, y, c, k, stream),
            (Kind::Backward, true) => log_softmax_bwd(s, x, other, y, c, k, stream),
            (Kind::FinishMaxNext, log) => {
                st.m = finish_max_next(s, x, y, c, log, stream, other, None);
                s.stream_fence();
                assert_eq!(st.m.to_bits(), max(s, other, Ahead::NONE).to_bits());
            }
        }
        (st.m, st.d)
    }
}

/// The streaming writers peel the output's unaligned head (see `stream_peel`), so they
/// reach aligned vectors wherever the output starts: at every offset from a 64-byte
/// boundary and every length (tails, and rows shorter than the peel), the streamed output
/// and the fused next-row state are bit for bit the plain (cached) ones, at every level,
/// for the forward writes, the backward maps and the pipelined three-pass finish (whose
/// fused max must also be the plain max).
#[test]
fn streamed_writes_match_plain_writes_at_every_alignment() {
    let len_max = 3 * BLOCK + 40;
    let x: Vec<f32> = (0..len_max).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.07).collect();
    let nx: Vec<f32> = (0..len_max).map(|i| ((i * 53 % 89) as f32 - 44.0) * 0.11).collect();
    // 64-byte aligned backing store, so `off` is the output's exact misalignment in f32s.
    let mut back = vec![[0.0f32; 16]; len_max / 16 + 2];
    for level in SimdLevel::available() {
        for log in [false, true] {
            for kind in [Kind::Write, Kind::WriteNext, Kind::Backward, Kind::FinishMaxNext] {
                for len in (0..70).chain([BLOCK - 1, BLOCK + 17, len_max - 16]) {
                    for off in 0..16 {
                        let mut want = vec![0.0f32; len];
                        let (xr, other) = (&x[..len], &nx[..len]);
                        let run = |y: &mut [f32], stream| {
                            dispatch(level, WritePass { kind, log, stream, io: (xr, y), other })
                        };
                        let sw = run(&mut want, false);
                        let flat = back.as_flattened_mut();
                        let y = &mut flat[off..off + len];
                        let sg = run(y, true);
                        let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{level:?} log={log} {kind:?} len={len} off={off}");
                        assert_eq!(sg.0.to_bits(), sw.0.to_bits());
                        assert_eq!(sg.1.to_bits(), sw.1.to_bits());
                    }
                }
            }
        }
    }
}

/// `stream_peel` stops exactly at the first vector-aligned element (or the end of a short
/// row), and peels nothing when not streaming.
#[test]
fn stream_peel_reaches_the_first_aligned_vector() {
    fn check<S: Isa>() {
        let align = S::F32_LANES * 4;
        let mut back = vec![[0.0f32; 16]; 4];
        let flat = back.as_flattened_mut();
        for off in 0..16 {
            for len in [0, 1, 5, 15, 16, 40] {
                let y = &flat[off..off + len];
                let h = stream_peel::<S>(y, true);
                assert_eq!(stream_peel::<S>(y, false), 0);
                assert!(h < S::F32_LANES.max(1) && h <= len, "off={off} len={len} h={h}");
                if h < len {
                    assert_eq!(y[h..].as_ptr() as usize % align, 0, "off={off} len={len}");
                }
            }
        }
    }
    check::<pulp::Scalar>();
    #[cfg(target_arch = "x86_64")]
    {
        check::<pulp::x86::V3>();
        check::<pulp::x86::V4>();
    }
    #[cfg(target_arch = "aarch64")]
    check::<pulp::aarch64::Neon>();
}
