//! The element-wise pieces of the forward pass every CPU path shares (the f32 reference and the
//! packed CPU backend, natively and in wasm): RMSNorm, rotary embeddings, SiLU, softmax
//! helpers. Plain loops the compiler vectorises.

/// RMSNorm of each row of `x` (width `w.len()`) into `out`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = xr.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / d as f64;
        let inv = 1.0 / ((ss as f32) + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// Dot product with 8 independent accumulators so the loop vectorises without fast-math.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// cos/sin tables for positions `pos0..pos0+t`, `[t][head_dim/2]` each.
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    half: usize,
}

impl Rope {
    pub fn new(theta: f32, head_dim: usize, pos0: usize, t: usize) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in pos0..pos0 + t {
            for i in 0..half {
                let inv_freq = (theta as f64).powf(-(2.0 * i as f64) / head_dim as f64);
                let a = p as f64 * inv_freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope { cos, sin, half }
    }

    /// Rotates every head of every row of `x` (`[t][n_heads*head_dim]`) in place, Hugging Face
    /// style: element i pairs with i + head_dim/2.
    pub fn apply(&self, x: &mut [f32], n_heads: usize) {
        let hd = self.half * 2;
        for (r, row) in x.chunks_exact_mut(n_heads * hd).enumerate() {
            let c = &self.cos[r * self.half..(r + 1) * self.half];
            let s = &self.sin[r * self.half..(r + 1) * self.half];
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(self.half);
                for i in 0..self.half {
                    let (x0, x1) = (a[i], b[i]);
                    a[i] = x0 * c[i] - x1 * s[i];
                    b[i] = x1 * c[i] + x0 * s[i];
                }
            }
        }
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Natural-log softmax normaliser of one row: `log Σ exp(x)`. Perplexity evaluates it over
/// every 49K-wide logits row of every candidate the builder scores, so it is written to
/// vectorise: the terms by `exp` (libm's scalar `expf` made it a third of the LM head's GEMM),
/// summed in eight lanes, and an AVX2 build chosen at run time.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { log_sum_exp_avx2(x) };
    }
    log_sum_exp_portable(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn log_sum_exp_avx2(x: &[f32]) -> f64 {
    log_sum_exp_portable(x)
}

#[inline(always)]
fn log_sum_exp_portable(x: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut mx = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in mx.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let m = tail
        .iter()
        .chain(&mx)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return m as f64; // all -inf (or a +inf/NaN logit): nothing to normalise
    }
    // The terms (in (0, 1]) of a block into a buffer (a plain map, which the loop vectoriser
    // takes), summed in f32 lanes, the blocks' sums in f64.
    const BLOCK: usize = 2048;
    let mut terms = [0f32; BLOCK];
    let mut total = 0f64;
    for block in x.chunks(BLOCK) {
        let terms = &mut terms[..block.len()];
        for (t, &v) in terms.iter_mut().zip(block) {
            *t = exp(v - m);
        }
        let mut acc = [0f32; LANES];
        let lanes = terms.chunks_exact(LANES);
        let rest: f32 = lanes.remainder().iter().sum();
        for c in lanes {
            for (a, &t) in acc.iter_mut().zip(c) {
                *a += t;
            }
        }
        total += (acc.iter().sum::<f32>() + rest) as f64;
    }
    m as f64 + total.ln()
}

/// `e^x` within 3 ulp of libm's `expf`, in plain arithmetic that vectorises (libm's is a
/// scalar call, which made the softmaxes, SiLU and perplexity's normaliser a sixth of the f32
/// forward): `2^n · e^y` with `n` the nearest integer to `x log2 e` (a rounding constant, not
/// `floor`; its bits give `n` as an integer, no float-to-int cast), `y = x - n ln 2` in two
/// parts (Cody-Waite: `ln 2` split so that `n · LN2_HI` is exact), `|y| <= ln 2 / 2`, and `e^y`
/// a degree-6 Taylor polynomial (error < 1.3e-7). 0 below -87.3 (where `e^x` leaves the normal
/// range), infinity from 88.37 (up to 0.35 before `expf` overflows), NaN for NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: 9 bits, so n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let t = x * std::f32::consts::LOG2_E;
    // Comparisons, not `max`/`min`, so that NaN stays NaN.
    let t = if t < -126.0 { -126.0 } else { t };
    let t = if t > 127.0 { 127.0 } else { t };
    let r = t + ROUND;
    let n = r - ROUND;
    let k = r.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let y = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + y * (1.0
            + y * (0.5
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    let scale = f32::from_bits((k.wrapping_add(127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else if x >= 88.37 {
        f32::INFINITY
    } else {
        p * scale
    }
}

/// Index of the largest value; ties go to the lowest index.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// The largest finite f16.
pub const F16_MAX: f32 = 65504.0;

/// `v` as an f16 bit pattern, rounded to nearest even and clamped to the finite range (never
/// infinity): how both backends store the KV cache (`cpu::kv`, `shaders/rope.wgsl`).
pub fn f16_bits(v: f32) -> u16 {
    half::f16::from_f32(v.clamp(-F16_MAX, F16_MAX)).to_bits()
}

#[cfg(test)]
mod lse_tests {
    use super::*;

    #[test]
    fn exp_is_within_three_ulp_of_libm() {
        let mut worst = 0f64;
        for i in 0..=4_000_000 {
            let x = -87.0 + 175.0 * i as f32 / 4_000_000.0;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(silu(-200.0), -0.0);
        assert!((silu(3.0) - 3.0 / (1.0 + (-3f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn log_sum_exp_matches_the_f64_definition() {
        for (n, spread) in [(1usize, 1.0f32), (7, 3.0), (49_152, 12.0), (1000, 80.0)] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0)
                .map(|u| (u * 2.0 - 1.0) * spread)
                .collect();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&x);
            assert!(
                (got - want).abs() < 1e-6 * want.abs().max(1.0),
                "{n}: {got} vs {want}"
            );
        }
        assert!(log_sum_exp(&[1.0, f32::NAN, 2.0]).is_nan());
    }
}
