//! InLine injective linear attention with its local term (A6).

use super::{AttentionInputs, AttentionOptions, AttentionShape, AttnElement, check_out, resolve};
use crate::arch::gemm::{MatRef, matmul};

use crate::check::{product, try_vec};
use crate::error::{Error, Result};
use crate::options::Par;

/// The kernel φ of [`inline_attention`] (A6; the authors' code offers these four).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum InlineKernel {
    /// φ(x) = x (the default; the only one for which the weights are provably injective in q).
    #[default]
    Identity,
    /// φ(x) = max(x, 0).
    Relu,
    /// φ(x) = x for x ≥ 0, `slope·x` below.
    LeakyRelu(f32),
    /// φ(x) = exp(0.2·x).
    Exp02,
}

impl InlineKernel {
    #[inline]
    fn apply(&self, x: f32) -> f32 {
        match *self {
            InlineKernel::Identity => x,
            InlineKernel::Relu => x.max(0.0),
            InlineKernel::LeakyRelu(s) => {
                if x >= 0.0 {
                    x
                } else {
                    s * x
                }
            }
            InlineKernel::Exp02 => (0.2 * x).exp(),
        }
    }

    /// φ and φ' in f64 (φ' of ReLU at 0 is 0, of leaky ReLU at 0 is 1, as PyTorch's autograd).
    #[inline]
    fn apply_grad64(&self, x: f64) -> (f64, f64) {
        match *self {
            InlineKernel::Identity => (x, 1.0),
            InlineKernel::Relu => (x.max(0.0), if x > 0.0 { 1.0 } else { 0.0 }),
            InlineKernel::LeakyRelu(s) => {
                if x >= 0.0 {
                    (x, 1.0)
                } else {
                    (s as f64 * x, s as f64)
                }
            }
            InlineKernel::Exp02 => {
                let e = (0.2 * x).exp();
                (e, 0.2 * e)
            }
        }
    }
}

/// InLine's local term (A6): a 3×3 depthwise convolution of the values over the token grid,
/// with a kernel per (batch, query head, channel) that the model predicts from the token mean
/// (its small prediction network stays in the model). Cross-correlation with zero padding, as
/// PyTorch's `conv2d`; the first `prefix` tokens (DeiT's class token) take no local term.
#[derive(Debug, Clone, Copy)]
pub struct InlineLocal<'a> {
    /// Grid height.
    pub height: usize,
    /// Grid width.
    pub width: usize,
    /// Tokens before the grid (no local term).
    pub prefix: usize,
    /// `[batch, q_heads, head_dim, 9]` row-major 3×3 kernels.
    pub kernel: &'a [f32],
}

/// The parameters of [`inline_attention`] (the `variant` of its [`AttentionOptions`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Inline<'a> {
    /// The kernel φ.
    pub kernel: InlineKernel,
    /// The optional local term.
    pub local: Option<InlineLocal<'a>>,
}

/// The checks [`inline_attention`] and its backward share: the options that do not apply,
/// the shape, the operands, `kv_len ≥ 1`, the kernel and the local term.
#[allow(clippy::type_complexity)]
fn checked<'x, 'a, T>(
    inputs: AttentionInputs<'x, T>,
    opts: &AttentionOptions<'a, Inline<'a>>,
) -> Result<(AttentionShape, [super::Op<'x, T>; 3], InlineKernel, Option<InlineLocal<'a>>)> {
    let AttentionInputs { shape, q, k, v } = inputs;
    let Inline { kernel, local } = opts.variant;
    let o = opts;
    if o.scale.is_some()
        || o.temperature != 1.0
        || o.softcap.is_some()
        || o.causal
        || o.window.is_some()
        || o.bias.is_some()
        || o.keep.is_some()
    {
        return Err(Error::Unsupported {
            what: "inline_attention options",
            why: "scale, temperature, softcap, causal, window, bias and keep do not apply to linear attention (only exec and the variant are read)",
        });
    }
    shape.validate()?;
    let (d, ql, kl) = (shape.head_dim, shape.q_len, shape.kv_len);
    let qo = resolve("q", q, shape.batch, shape.q_heads, ql, d)?;
    let ko = resolve("k", k, shape.batch, shape.kv_heads, kl, d)?;
    let vo = resolve("v", v, shape.batch, shape.kv_heads, kl, d)?;
    if kl == 0 {
        return Err(Error::bad_parameter("kv_len", "0", ">= 1 (InLine attention is undefined over zero keys)"));
    }
    if let InlineKernel::LeakyRelu(s) = kernel
        && !s.is_finite()
    {
        return Err(Error::bad_parameter("leaky relu slope", s, "finite"));
    }
    if let Some(l) = local {
        let tokens = l.height.checked_mul(l.width).and_then(|hw| hw.checked_add(l.prefix));
        if ql != kl || tokens != Some(kl) {
            return Err(Error::Unsupported {
                what: "inline local term",
                why: "needs q_len = kv_len = prefix + height * width",
            });
        }
        check_out("local kernel", l.kernel.len(), product("local kernel", &[shape.batch, shape.q_heads, d, 9])?)?;
    }
    Ok((shape, [qo, ko, vo], kernel, local))
}

/// InLine injective linear attention (Han et al. 2024, A6), non-causal, in `O(N·d²)`:
/// `o_i = φ(q_i)ᵀ·(c·Σ_j φ(k_j) v_jᵀ) + (1 − N·c·φ(q_i)·k̄_φ)·v̄`, `c = d^{−1/2}/N`, which equals
/// `Σ_j w_ij v_j` with the weights `w_ij = c·(φ(q_i)·φ(k_j) − φ(q_i)·k̄_φ) + 1/N` (rows sum to 1
/// exactly; weights can be negative). Plus the optional [`InlineLocal`] term, which needs
/// `q_len = kv_len = prefix + height·width`.
///
/// Shapes and layouts as [`attention`](super::attention) (grouped-query allowed); masks do not
/// apply (remove padded tokens instead: `-inf` has no meaning in a linear kernel). `Σ φ(k)vᵀ`
/// and the means accumulate in f32 through `gemm` and f64 sums. Errors: `kv_len = 0`, a local
/// term whose grid or kernel does not match, the shape and buffer errors of
/// [`attention`](super::attention), and a head dimension whose `d x d` matrix does not fit in
/// memory ([`Error::SizeOverflow`](crate::Error::SizeOverflow),
/// [`Error::Allocation`](crate::Error::Allocation)).
pub fn inline_attention<'a, T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    out: &mut [T],
    opts: &AttentionOptions<'a, Inline<'a>>,
) -> Result<()> {
    let (shape, [qo, ko, vo], kernel, local) = checked(inputs, opts)?;
    check_out("out", out.len(), shape.out_len())?;
    let (d, ql) = (shape.head_dim, shape.q_len);
    if shape.out_len() == 0 {
        return Ok(());
    }
    let heads: Vec<(usize, &mut [T])> = out.chunks_mut(ql * d).enumerate().collect();
    // Each head builds the `d x d` matrix KV: a size the shape alone sets, checked here.
    let kv_len = product("inline KV", &[d, d])?;
    let done = crate::par::map(opts.exec.par, heads, |(bh, o)| {
        let (b, h) = (bh / shape.q_heads, bh % shape.q_heads);
        let (mut o32, vv) = inline_head(&shape, kernel, (&qo, &ko, &vo), (b, h), kv_len)?;
        if let Some(l) = local {
            let kern = &l.kernel[(b * shape.q_heads + h) * d * 9..][..d * 9];
            add_local_term(&l, kern, &vv, d, &mut o32);
        }
        T::store_f32(&o32, o);
        Ok(())
    });
    done.into_iter().collect()
}

/// The linear-attention output of head `(b, h)` in f32, and the head's values in f32 (which
/// the local term reads).
fn inline_head<T: AttnElement>(
    shape: &AttentionShape,
    kernel: InlineKernel,
    (qo, ko, vo): (&super::Op<'_, T>, &super::Op<'_, T>, &super::Op<'_, T>),
    (b, h): (usize, usize),
    kv_len: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (d, ql, kl) = (shape.head_dim, shape.q_len, shape.kv_len);
    let c = (1.0 / (d as f64).sqrt()) / kl as f64;
    let hk = h / shape.group();
    // φ(K), V (f32), then KV = φ(K)ᵀ V, k̄_φ and v̄.
    let mut fk = vec![0.0f32; kl * d];
    let mut vv = vec![0.0f32; kl * d];
    for j in 0..kl {
        T::load_f32(ko.row(b, hk, j, d), &mut fk[j * d..(j + 1) * d]);
        T::load_f32(vo.row(b, hk, j, d), &mut vv[j * d..(j + 1) * d]);
    }
    for x in fk.iter_mut() {
        *x = kernel.apply(*x);
    }
    let mut kvm = try_vec("inline KV", kv_len, 0.0f32)?;
    matmul(&mut kvm, d, MatRef::row_major(&fk, kl, d).t(), MatRef::row_major(&vv, kl, d), false, Par::Seq);
    let mean = |m: &[f32]| -> Vec<f64> {
        let mut s = vec![0.0f64; d];
        for r in m.chunks(d) {
            for (a, &x) in s.iter_mut().zip(r) {
                *a += x as f64;
            }
        }
        s.iter().map(|x| x / kl as f64).collect()
    };
    let (kbar, vbar) = (mean(&fk), mean(&vv));
    let mut fq = vec![0.0f32; ql * d];
    for i in 0..ql {
        T::load_f32(qo.row(b, h, i, d), &mut fq[i * d..(i + 1) * d]);
    }
    for x in fq.iter_mut() {
        *x = kernel.apply(*x);
    }
    let mut o32 = vec![0.0f32; ql * d];
    matmul(&mut o32, d, MatRef::row_major(&fq, ql, d), MatRef::row_major(&kvm, d, d), false, Par::Seq);
    for i in 0..ql {
        let qk: f64 = fq[i * d..(i + 1) * d].iter().zip(&kbar).map(|(a, b)| *a as f64 * b).sum();
        let coef = 1.0 - kl as f64 * c * qk;
        for (x, &vb) in o32[i * d..(i + 1) * d].iter_mut().zip(&vbar) {
            *x = (*x as f64 * c + coef * vb) as f32;
        }
    }
    Ok((o32, vv))
}

/// Adds InLine's local term (the 3×3 depthwise convolution of the values `vv` over the token
/// grid, kernel `kern` `[head_dim, 9]`) to the head's output `o32`.
fn add_local_term(l: &InlineLocal<'_>, kern: &[f32], vv: &[f32], d: usize, o32: &mut [f32]) {
    // Each output sums its taps in f64 and is rounded once.
    let mut acc = vec![0.0f64; o32.len()];
    for_local_taps(l, |t, src, tap| {
        for ch in 0..d {
            acc[t * d + ch] += kern[ch * 9 + tap] as f64 * vv[src * d + ch] as f64;
        }
    });
    for (o, a) in o32[l.prefix * d..].iter_mut().zip(&acc[l.prefix * d..]) {
        *o += *a as f32;
    }
}

/// Calls `f(t, src, tap)` for every grid token `t`, every in-grid neighbour `src` of it and
/// the tap index `ky·3 + kx` that joins them (zero padding: out-of-grid taps are skipped).
fn for_local_taps(l: &InlineLocal<'_>, mut f: impl FnMut(usize, usize, usize)) {
    let (hh, ww) = (l.height as i64, l.width as i64);
    for y in 0..hh {
        for x in 0..ww {
            let t = l.prefix + (y * ww + x) as usize;
            for ky in 0..3i64 {
                for kx in 0..3i64 {
                    let (yy, xx) = (y + ky - 1, x + kx - 1);
                    if yy < 0 || yy >= hh || xx < 0 || xx >= ww {
                        continue;
                    }
                    f(t, l.prefix + (yy * ww + xx) as usize, (ky * 3 + kx) as usize);
                }
            }
        }
    }
}

/// The backward pass of [`inline_attention`]: from the upstream gradient `d_out`
/// (`[batch, q_heads, q_len, head_dim]`, contiguous) the gradients of the queries, keys and
/// values into `grads` (contiguous `bhsd`; `d_bias` must be `None`) and, with a local term,
/// of its kernels into `d_local_kernel` (`[batch, q_heads, head_dim, 9]`). With `f = φ(q)`,
/// `g = φ(k)`, `KV = Σ_j g_j v_jᵀ`, `k̄ = mean g`, `v̄ = mean v` and `c = d^{−1/2}/N`:
///
/// - `df_i = c·KV·dO_i − N·c·(v̄·dO_i)·k̄`, `dq_i = φ'(q_i) ⊙ df_i`;
/// - `dKV = c·Σ_i f_i dO_iᵀ`, `dk̄ = −N·c·Σ_i (v̄·dO_i) f_i`, `dv̄ = Σ_i (1 − N·c·f_i·k̄) dO_i`;
/// - `dk_j = φ'(k_j) ⊙ (dKV·v_j + dk̄/N)`, `dv_j = dKVᵀ·g_j + dv̄/N`, summed over the query
///   heads of a group;
/// - the local term adds `Σ kern·dO` to the values it read and `Σ dO·v` to its kernels.
///
/// In f64, `O(N·d²)` per head like the forward. Tested against finite differences of an f64
/// forward. Errors: as [`inline_attention`], gradient buffers of the wrong size, a `d_bias`,
/// and a local term without `d_local_kernel` (or the reverse).
pub fn inline_attention_backward<'a, T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    d_out: &[T],
    grads: super::AttentionGrads<'_, T>,
    d_local_kernel: Option<&mut [f32]>,
    opts: &AttentionOptions<'a, Inline<'a>>,
) -> Result<()> {
    let (shape, [qo, ko, vo], kernel, local) = checked(inputs, opts)?;
    let (d, ql, kl, grp) = (shape.head_dim, shape.q_len, shape.kv_len, shape.group());
    check_out("d_out", d_out.len(), shape.out_len())?;
    if grads.d_bias.is_some() {
        return Err(Error::Unsupported { what: "d_bias", why: "linear attention takes no score bias" });
    }
    let super::AttentionGrads { dq, dk, dv, .. } = grads;
    check_out("dq", dq.len(), shape.out_len())?;
    check_out("dk", dk.len(), shape.kv_len_elems())?;
    check_out("dv", dv.len(), shape.kv_len_elems())?;
    let dkern = match (local, d_local_kernel) {
        (Some(l), Some(g)) => {
            check_out("d_local_kernel", g.len(), l.kernel.len())?;
            g.fill(0.0);
            Some(g)
        }
        (None, None) => None,
        _ => {
            return Err(Error::Unsupported {
                what: "d_local_kernel",
                why: "is given exactly when the options carry a local term",
            });
        }
    };
    for g in [&mut *dq, &mut *dk, &mut *dv] {
        g.fill(T::from_f32(0.0));
    }
    if shape.out_len() == 0 {
        return Ok(());
    }
    let c = (1.0 / (d as f64).sqrt()) / kl as f64;
    let nc = kl as f64 * c;
    let per_kern = d * 9;
    let kern_groups: Vec<Option<&mut [f32]>> = match dkern {
        Some(g) => g.chunks_mut(grp * per_kern).map(Some).collect(),
        None => (0..shape.batch * shape.kv_heads).map(|_| None).collect(),
    };
    let tasks: Vec<_> = dq
        .chunks_mut(grp * ql * d)
        .zip(dk.chunks_mut(kl * d).zip(dv.chunks_mut(kl * d)))
        .zip(kern_groups)
        .enumerate()
        .collect();
    // Each group builds two `d x d` matrices (KV and its gradient): a size the shape alone
    // sets, checked and allocated fallibly.
    let dd = product("inline KV", &[d, d])?;
    let done = crate::par::map(opts.exec.par, tasks, |(bg, ((dqg, (dkg, dvg)), mut dkg_kern))| -> Result<()> {
        let (b, hk) = (bg / shape.kv_heads, bg % shape.kv_heads);
        let load = |op: &super::Op<'_, T>, h: usize, t: usize| -> Vec<f64> {
            op.row(b, h, t, d).iter().map(|x| x.to_f64()).collect()
        };
        let kraw: Vec<Vec<f64>> = (0..kl).map(|j| load(&ko, hk, j)).collect();
        let vals: Vec<Vec<f64>> = (0..kl).map(|j| load(&vo, hk, j)).collect();
        let g: Vec<Vec<f64>> = kraw.iter().map(|r| r.iter().map(|&x| kernel.apply_grad64(x).0).collect()).collect();
        let (mut kv, mut kbar, mut vbar) = (try_vec("inline KV", dd, 0.0f64)?, vec![0.0f64; d], vec![0.0f64; d]);
        for j in 0..kl {
            for a in 0..d {
                kbar[a] += g[j][a] / kl as f64;
                vbar[a] += vals[j][a] / kl as f64;
                for bb in 0..d {
                    kv[a * d + bb] += g[j][a] * vals[j][bb];
                }
            }
        }
        let (mut dkv, mut dkbar, mut dvbar) = (try_vec("inline KV", dd, 0.0f64)?, vec![0.0f64; d], vec![0.0f64; d]);
        let mut dv64 = vec![0.0f64; kl * d];
        for hq in 0..grp {
            let h = hk * grp + hq;
            let dor = |i: usize| &d_out[((b * shape.q_heads + h) * ql + i) * d..][..d];
            for i in 0..ql {
                let go: Vec<f64> = dor(i).iter().map(|x| x.to_f64()).collect();
                let (f, fp): (Vec<f64>, Vec<f64>) = load(&qo, h, i).iter().map(|&x| kernel.apply_grad64(x)).unzip();
                let vd: f64 = vbar.iter().zip(&go).map(|(a, b)| a * b).sum();
                let fk: f64 = f.iter().zip(&kbar).map(|(a, b)| a * b).sum();
                for a in 0..d {
                    let kvd: f64 = (0..d).map(|bb| kv[a * d + bb] * go[bb]).sum();
                    let df = c * kvd - nc * vd * kbar[a];
                    dqg[(hq * ql + i) * d + a] = T::from_f64(fp[a] * df);
                    dkbar[a] -= nc * vd * f[a];
                    dvbar[a] += (1.0 - nc * fk) * go[a];
                    for bb in 0..d {
                        dkv[a * d + bb] += c * f[a] * go[bb];
                    }
                }
            }
            if let Some(l) = local {
                let kern = &l.kernel[(b * shape.q_heads + h) * per_kern..][..per_kern];
                let mut dkh = dkg_kern.as_deref_mut().map(|k| &mut k[hq * per_kern..(hq + 1) * per_kern]);
                for_local_taps(&l, |t, src, tap| {
                    let go = dor(t);
                    for ch in 0..d {
                        let gch = go[ch].to_f64();
                        dv64[src * d + ch] += kern[ch * 9 + tap] as f64 * gch;
                        if let Some(dk) = dkh.as_deref_mut() {
                            dk[ch * 9 + tap] += (gch * vals[src][ch]) as f32;
                        }
                    }
                });
            }
        }
        for j in 0..kl {
            for a in 0..d {
                let gv: f64 = (0..d).map(|bb| dkv[a * d + bb] * vals[j][bb]).sum();
                let fp = kernel.apply_grad64(kraw[j][a]).1;
                dkg[j * d + a] = T::from_f64(fp * (gv + dkbar[a] / kl as f64));
                let vg: f64 = (0..d).map(|aa| dkv[aa * d + a] * g[j][aa]).sum();
                dvg[j * d + a] = T::from_f64(dv64[j * d + a] + vg + dvbar[a] / kl as f64);
            }
        }
        Ok(())
    });
    done.into_iter().collect()
}
