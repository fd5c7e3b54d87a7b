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
    x / (1.0 + (-x).exp())
}

/// Natural-log softmax normaliser of one row: `log Σ exp(x)`.
pub fn log_sum_exp(x: &[f32]) -> f64 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // f32 exp (each term is in (0, 1]), f64 accumulation over the 49K-wide rows.
    let s: f64 = x
        .chunks(256)
        .map(|c| c.iter().map(|v| (v - m).exp()).sum::<f32>() as f64)
        .sum();
    m as f64 + s.ln()
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
