//! Which `matvec` variant an adapter runs: a short timed probe at the first load on an adapter
//! (each candidate on the matvecs of a token of the demo model's shapes: its modules' small
//! matrices, whose cost is latency, and the head's large one, whose cost is bandwidth; best of
//! a few timed passes after a warm-up that compiles its pipeline), cached for the process by
//! adapter name. The adapter's type
//! orders the candidates (and decides alone if the probe cannot run); `FLEXQUANT_GPU_TPR` /
//! `FLEXQUANT_GPU_RPT` / `FLEXQUANT_GPU_SG` skip the probe.

use crate::gpu::device::Gpu;
use crate::gpu::kernels::Kernels;
use crate::gpu::probe;
use std::sync::Mutex;

/// `(threads, rows)` per lane group the probe times on every adapter. Groups of several
/// threads sharing several rows ((4, 4), (16, 2)) pass the parity tests but measured slower on
/// both adapters at hand (the H200: 1.56-2.9 ms against 1.5 ms for a token's matvecs; lavapipe:
/// no better than a row group per thread), so the probe does not spend a load's time on them.
pub const CANDIDATES: [(u32, u32); 5] = [(1, 4), (1, 1), (4, 1), (16, 1), (32, 1)];

/// The variants the probe times on `gpu`: `CANDIDATES` with the workgroup-memory row sums,
/// and each shared-row one with subgroup sums where the adapter's subgroups hold its row.
pub fn candidates(gpu: &Gpu) -> Vec<(u32, u32, bool)> {
    let lanes = gpu.subgroup_lanes().unwrap_or(0);
    let plain = CANDIDATES.iter().map(|&(t, r)| (t, r, false));
    let sg = CANDIDATES
        .iter()
        .filter(|&&(t, _)| t > 1 && t <= lanes)
        .map(|&(t, r)| (t, r, true));
    plain.chain(sg).collect()
}

/// The probe's module matrix: the demo model's gate/up shape, 4 bits in groups of 32.
const PROBE_ROWS: usize = 1536;
const PROBE_COLS: usize = 576;
/// Module matvecs per token of the demo model (30 layers of 7), each timed as the probe's.
const MODULES_PER_TOKEN: f64 = 210.0;
/// The head: the vocabulary's rows at 8 bits.
const HEAD_ROWS: usize = 49152;
/// Dispatches per timed pass, and timed passes per candidate.
const REPEAT: u32 = 8;
const PASSES: usize = 2;

/// What was chosen for an adapter, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub tpr: u32,
    pub rpt: u32,
    pub subgroups: bool,
    /// `"probe"`, `"environment"` or `"adapter type"` (the probe failed).
    pub by: &'static str,
    /// Seconds of a token's matvecs (210 modules and the head, demo model's shapes) of each
    /// candidate timed, `(tpr, rpt, subgroups, seconds)`.
    pub timings: Vec<(u32, u32, bool, f64)>,
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
    Kernels::with_variant(choice.tpr, choice.rpt, choice.subgroups)
        .unwrap_or_else(|_| Kernels::new(gpu))
}

async fn choose(gpu: &Gpu) -> Choice {
    let by_type = Kernels::new(gpu);
    let env = |n: &str| std::env::var(n).is_ok();
    if env("FLEXQUANT_GPU_TPR") || env("FLEXQUANT_GPU_RPT") || env("FLEXQUANT_GPU_SG") {
        return Choice {
            tpr: by_type.tpr,
            rpt: by_type.rpt,
            subgroups: by_type.subgroups,
            by: "environment",
            timings: vec![],
        };
    }
    match time_candidates(gpu).await {
        Some(timings) => {
            let best = timings
                .iter()
                .min_by(|a, b| a.3.total_cmp(&b.3))
                .copied()
                .unwrap();
            Choice {
                tpr: best.0,
                rpt: best.1,
                subgroups: best.2,
                by: "probe",
                timings,
            }
        }
        None => Choice {
            tpr: by_type.tpr,
            rpt: by_type.rpt,
            subgroups: by_type.subgroups,
            by: "adapter type",
            timings: vec![],
        },
    }
}

/// Seconds of a token's matvecs for every candidate, buffers on the device (`None` if the
/// probe's matrices cannot be made). Dispatches per timed pass, module and head: 8 and 1 on
/// CPU adapters, 64 and 8 on others, where a module's matvec takes microseconds and a
/// submission's round trip would otherwise dominate.
async fn time_candidates(gpu: &Gpu) -> Option<Vec<(u32, u32, bool, f64)>> {
    let (repeat, head_repeat) = if gpu.info.device_type == wgpu::DeviceType::Cpu {
        (REPEAT, 1)
    } else {
        (8 * REPEAT, REPEAT)
    };
    let mut timings = Vec::new();
    for (t, r, sg) in candidates(gpu) {
        let Ok(mut k) = Kernels::with_variant(t, r, sg) else {
            continue;
        };
        // The kernel decode runs here for most modules and for the head.
        let norm = match gpu.folds_norms_by_default() {
            true => probe::MatvecForm::Norm,
            false => probe::MatvecForm::Packed,
        };
        let (rows, cols) = (PROBE_ROWS, PROBE_COLS);
        let module = probe::matvec_seconds(gpu, &mut k, rows, cols, 4, norm, repeat, PASSES)
            .await
            .ok()?;
        let head =
            probe::matvec_seconds(gpu, &mut k, HEAD_ROWS, cols, 8, norm, head_repeat, PASSES)
                .await
                .ok()?;
        timings.push((t, r, sg, MODULES_PER_TOKEN * module + head));
    }
    Some(timings)
}
