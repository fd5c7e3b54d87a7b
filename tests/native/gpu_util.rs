//! Shared by the GPU tests: one device per test process, and the loud skip when there is none.

use flexquant::gpu::{Gpu, Kernels, Requirements};
use std::sync::OnceLock;

/// The device, or `None` after printing why. With FLEXQUANT_REQUIRE_GPU=1 (as `./build.sh test`
/// and CI set it) a missing adapter fails the test instead: GPU tests must not skip silently.
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    let g = GPU.get_or_init(|| {
        // Enough for the demo model's largest binding (its f16 embedding, 57 MB) and more.
        let req = Requirements {
            max_binding: 120 << 20,
            max_workgroups: 65535,
        };
        match Gpu::new_blocking(req) {
            Ok(g) => {
                eprintln!("GPU tests on {}", g.adapter_name());
                Some(g)
            }
            Err(e) => {
                if std::env::var("FLEXQUANT_REQUIRE_GPU").as_deref() == Ok("1") {
                    panic!("no wgpu adapter ({e}) and FLEXQUANT_REQUIRE_GPU=1: install mesa-vulkan-drivers");
                }
                None
            }
        }
    });
    if g.is_none() {
        eprintln!("SKIP: no wgpu adapter (install mesa-vulkan-drivers)");
    }
    g.as_ref()
}

pub fn kernels_for(gpu: &Gpu) -> Kernels {
    Kernels::new(gpu)
}

pub fn f32s(b: &[u8]) -> Vec<f32> {
    bytemuck::cast_slice(b).to_vec()
}

pub fn u32s(b: &[u8]) -> Vec<u32> {
    bytemuck::cast_slice(b).to_vec()
}

/// The shared device as an `Arc`, for models.
pub fn gpu_arc() -> Option<std::sync::Arc<Gpu>> {
    static GPU: OnceLock<Option<std::sync::Arc<Gpu>>> = OnceLock::new();
    GPU.get_or_init(|| {
        let req = Requirements {
            max_binding: 120 << 20,
            max_workgroups: 65535,
        };
        match Gpu::new_blocking(req) {
            Ok(g) => Some(std::sync::Arc::new(g)),
            Err(e) => {
                if std::env::var("FLEXQUANT_REQUIRE_GPU").as_deref() == Ok("1") {
                    panic!("no wgpu adapter ({e}) and FLEXQUANT_REQUIRE_GPU=1: install mesa-vulkan-drivers");
                }
                eprintln!("SKIP: no wgpu adapter (install mesa-vulkan-drivers)");
                None
            }
        }
    })
    .clone()
}
