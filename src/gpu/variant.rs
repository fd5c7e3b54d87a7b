//! Which `matvec` variant an adapter runs: a short timed probe at the first load on an adapter
//! (each candidate on a module-sized 4-bit matrix, best of a few timed passes after a warm-up
//! that compiles its pipeline), cached for the process by adapter name. The adapter's type
//! orders the candidates (and decides alone if the probe cannot run); `FLEXQUANT_GPU_TPR` /
//! `FLEXQUANT_GPU_RPT` skip the probe.

use crate::ensemble::format::PackedShape;
use crate::gpu::device::Gpu;
use crate::gpu::kernels::{Kernel, Kernels};
use crate::gpu::params::QlinearParams;
use crate::gpu::probe;
use std::sync::Mutex;

/// `(threads per row, rows per thread)` pairs the probe times.
pub const CANDIDATES: [(u32, u32); 4] = [(1, 4), (1, 1), (4, 1), (16, 1)];
/// The probe's matrix: the demo model's gate/up shape, 4 bits in groups of 32.
const PROBE_ROWS: usize = 1536;
const PROBE_COLS: usize = 576;
/// Dispatches per timed pass, and timed passes per candidate.
const REPEAT: u32 = 8;
const PASSES: usize = 2;

/// What was chosen for an adapter, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub tpr: u32,
    pub rpt: u32,
    /// `"probe"`, `"environment"` or `"adapter type"` (the probe failed).
    pub by: &'static str,
    /// Seconds per matvec of each candidate timed, `(tpr, rpt, seconds)`.
    pub timings: Vec<(u32, u32, f64)>,
}

static CHOSEN: Mutex<Vec<(String, Choice)>> = Mutex::new(Vec::new());

/// The choice made for `gpu`'s adapter in this process, if any.
pub fn chosen(gpu: &Gpu) -> Option<Choice> {
    let name = gpu.adapter_name();
    let cache = CHOSEN.lock().unwrap_or_else(|e| e.into_inner());
    cache.iter().find(|c| c.0 == name).map(|c| c.1.clone())
}

/// Kernels with the variant chosen for `gpu`'s adapter (probing it on the first call).
pub async fn kernels_for_adapter(gpu: &Gpu) -> Kernels {
    let choice = match chosen(gpu) {
        Some(c) => c,
        None => {
            let c = choose(gpu).await;
            let mut cache = CHOSEN.lock().unwrap_or_else(|e| e.into_inner());
            cache.push((gpu.adapter_name(), c.clone()));
            c
        }
    };
    Kernels::with_matvec(choice.tpr, choice.rpt).unwrap_or_else(|_| Kernels::new(gpu))
}

async fn choose(gpu: &Gpu) -> Choice {
    let by_type = Kernels::new(gpu);
    let env = |n: &str| std::env::var(n).is_ok();
    if env("FLEXQUANT_GPU_TPR") || env("FLEXQUANT_GPU_RPT") {
        return Choice {
            tpr: by_type.tpr,
            rpt: by_type.rpt,
            by: "environment",
            timings: vec![],
        };
    }
    match time_candidates(gpu).await {
        Some(timings) => {
            let best = timings
                .iter()
                .min_by(|a, b| a.2.total_cmp(&b.2))
                .copied()
                .unwrap();
            Choice {
                tpr: best.0,
                rpt: best.1,
                by: "probe",
                timings,
            }
        }
        None => Choice {
            tpr: by_type.tpr,
            rpt: by_type.rpt,
            by: "adapter type",
            timings: vec![],
        },
    }
}

/// Seconds per matvec of every candidate, or `None` if a run failed.
async fn time_candidates(gpu: &Gpu) -> Option<Vec<(u32, u32, f64)>> {
    let shape = PackedShape::new(PROBE_ROWS, PROBE_COLS, 4, 32).ok()?;
    // Codes from a small LCG; every (scale, zero) is (0.01, 0) as two f16 halves.
    let mut state = 0x9E37_79B9u32;
    let mut words: Vec<u32> = (0..shape.code_words())
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state
        })
        .collect();
    words.extend(std::iter::repeat_n(0x211F, shape.scale_words()));
    let x: Vec<f32> = (0..PROBE_COLS).map(|i| (i % 7) as f32 * 0.1).collect();
    let y = vec![0f32; PROBE_ROWS];
    let params = QlinearParams::dense(shape);
    let mut kernels: Vec<Kernels> = CANDIDATES
        .iter()
        .filter_map(|&(t, r)| Kernels::with_matvec(t, r).ok())
        .collect();
    let mut best = vec![f64::MAX; kernels.len()];
    for pass in 0..=PASSES {
        for (k, b) in kernels.iter_mut().zip(&mut best) {
            let grid = [
                (PROBE_ROWS as u32).div_ceil(k.matvec_rows_per_workgroup()),
                1,
                1,
            ];
            let t = crate::runtime::clock::now_seconds();
            probe::run_repeated(
                gpu,
                k,
                Kernel::Matvec(4),
                &params,
                (1, 0),
                &[bytemuck::cast_slice(&words), bytemuck::cast_slice(&x)],
                &[bytemuck::cast_slice(&y)],
                grid,
                REPEAT,
            )
            .await
            .ok()?;
            // Pass 0 compiles the pipeline: not timed.
            if pass > 0 {
                *b = b.min((crate::runtime::clock::now_seconds() - t) / REPEAT as f64);
            }
        }
    }
    Some(
        kernels
            .iter()
            .zip(best)
            .map(|(k, s)| (k.tpr, k.rpt, s))
            .collect(),
    )
}
