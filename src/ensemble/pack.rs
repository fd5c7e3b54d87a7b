//! Packs: an ensemble's module versions written back to back into a few files, so that a cold
//! load makes a few requests instead of one per module version (213 for the demo model, which
//! HTTP/1.1's six connections per host serialize into 36 round trips). Static hosts need no
//! Range requests: a pack is fetched whole and every file in it is verified by its own hash
//! and cached under its own name, so swaps, the cache and `Engine.cached` see files as before.
//!
//! Order: the versions a walk down the trajectory needs first come first. Step 0's versions
//! (every module at `n_up`) fill the first packs, the modules swapped out last first; then the
//! lower versions in the order the trajectory swaps them in, so the pack a swap down fetches
//! also holds the next swaps' versions.

use crate::ensemble::files::read_verified;
use crate::ensemble::manifest::{sha256_hex, Manifest, Pack, PackSlice, VERSION};
use crate::error::{Error, Result};
use crate::model::weights::ModuleId;
use std::path::{Path, PathBuf};

/// The largest pack by default (`--pack-mb`).
pub const DEFAULT_PACK_MB: f64 = 32.0;
/// Step 0's versions are cut into at least this many packs of equal size: with the tokenizer
/// and the base, a cold load is six requests, one round over the six connections per host
/// Chromium opens on HTTP/1.1. By measurement on the demo (`bench-latency.html`, 50 ms per
/// response, same run): 4 packs of 15 MB downloaded in 0.42-0.51 s, 8 of 7.5 MB in
/// 0.45-0.73 s, 16 of 3.8 MB in 0.60-0.83 s, one file of the same bytes in 0.31-0.39 s.
pub const FIRST_LOAD_PACKS: u64 = 4;
/// The lower versions' packs (at most `--pack-mb`): what a swap the prefetch has not covered
/// waits for, with the next swaps' versions.
pub const SWAP_PACK_BYTES: u64 = 2 << 20;
/// Directory of the pack files, relative to the manifest.
pub const DIR: &str = "packs";

/// `--pack-mb` as bytes (0 for 0: no packs).
pub fn mb_to_bytes(mb: f64) -> Result<u64> {
    if !(mb.is_finite() && (0.0..=4096.0).contains(&mb)) {
        return Err(Error::input(format!(
            "--pack-mb {mb}: expected a size from 0 to 4096 MB"
        )));
    }
    Ok((mb * (1u64 << 20) as f64) as u64)
}

/// Indices into `m.modules`, in first-use order, cut into packs of at most `max` bytes (a
/// version bigger than that gets a pack of its own): step 0's versions (what a cold load
/// fetches) into `FIRST_LOAD_PACKS` packs of equal size, more if they would exceed `max`; the
/// lower versions into packs of `SWAP_PACK_BYTES` (or `max` if smaller). Step 0's versions
/// never share a pack with lower ones.
pub fn plan(m: &Manifest, max: u64) -> Vec<Vec<usize>> {
    let n = m.n_modules();
    let t = &m.trajectory;
    // The step that swaps each module out of n_up (the last step when it never is).
    let mut leaves_up = vec![t.len(); n];
    let mut order_low = Vec::new();
    for (i, s) in t.iter().enumerate() {
        let Some(sw) = &s.swap else { continue };
        let id = ModuleId {
            layer: sw.layer,
            kind: sw.kind,
        };
        if sw.from_bits == m.n_up {
            leaves_up[id.index()] = i;
        }
        order_low.push((id.index(), sw.to_bits));
    }
    let index: std::collections::HashMap<(usize, u32), usize> = m
        .modules
        .iter()
        .enumerate()
        .map(|(i, v)| ((v.id().index(), v.bits), i))
        .collect();
    let mut modules: Vec<usize> = (0..n).collect();
    modules.sort_by_key(|&i| std::cmp::Reverse(leaves_up[i]));
    let mut seen = vec![false; m.modules.len()];
    let mut take = |k: &(usize, u32)| {
        let i = *index.get(k)?;
        (!std::mem::replace(&mut seen[i], true)).then_some(i)
    };
    let up: Vec<usize> = modules.iter().filter_map(|&i| take(&(i, m.n_up))).collect();
    let low: Vec<usize> = order_low.iter().filter_map(&mut take).collect();
    // Versions the trajectory never swaps in (none in a valid manifest, kept all the same).
    let rest: Vec<usize> = (0..m.modules.len()).filter(|&i| !seen[i]).collect();
    let up_bytes: u64 = up.iter().map(|&i| m.modules[i].file.bytes).sum();
    let n_up = FIRST_LOAD_PACKS.max(up_bytes.div_ceil(max.max(1)));
    let swap = SWAP_PACK_BYTES.min(max);
    let mut packs = Vec::new();
    for (group, target) in [(up, up_bytes.div_ceil(n_up)), (low, swap), (rest, swap)] {
        // Cut at the file boundary nearest each multiple of `target` (where a file's middle
        // crosses it), so `n` targets' worth of files make `n` packs.
        let target = target.max(1);
        let (mut cur, mut done, mut next) = (Vec::new(), 0, target);
        for i in group {
            let b = m.modules[i].file.bytes;
            let middle = done + b / 2;
            if middle >= next {
                if !cur.is_empty() {
                    packs.push(std::mem::take(&mut cur));
                }
                next = (middle / target + 1) * target;
            }
            cur.push(i);
            done += b;
        }
        if !cur.is_empty() {
            packs.push(cur);
        }
    }
    packs
}

/// Packs the module versions of the ensemble in `dir` (one file per version, or packs of
/// another size) into `packs/*.bin` named by their content's hash, updating `m` (now version
/// 2). Every file is verified before it is packed. Returns the files the new packs replace,
/// which the caller removes once it has written the manifest.
pub fn pack_files(dir: &Path, m: &mut Manifest, max: u64) -> Result<Vec<PathBuf>> {
    if max == 0 {
        return Err(Error::input("a pack size of 0 bytes"));
    }
    let old: Vec<PathBuf> = if m.packs.is_empty() {
        m.modules.iter().map(|v| dir.join(&v.file.file)).collect()
    } else {
        m.packs.iter().map(|p| dir.join(&p.file)).collect()
    };
    let plan = plan(m, max);
    let out = dir.join(DIR);
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let mut packs = Vec::with_capacity(plan.len());
    let mut slices = Vec::with_capacity(m.modules.len());
    for members in &plan {
        let mut bytes = Vec::new();
        for &i in members {
            // Read where the file is now (its own file or an old pack, never a new one).
            slices.push((i, bytes.len() as u64));
            bytes.extend(read_verified(dir, &m.modules[i].file)?);
        }
        let name = format!("{DIR}/{}.bin", &sha256_hex(&bytes)[..16]);
        let p = dir.join(&name);
        std::fs::write(&p, &bytes).map_err(|e| Error::io(&p, e))?;
        for &(i, offset) in &slices[slices.len() - members.len()..] {
            m.modules[i].file.pack = Some(PackSlice {
                pack: name.clone(),
                offset,
            });
        }
        packs.push(Pack {
            file: name,
            bytes: bytes.len() as u64,
        });
    }
    let new: std::collections::HashSet<PathBuf> = packs.iter().map(|p| dir.join(&p.file)).collect();
    m.packs = packs;
    m.version = VERSION;
    Ok(old.into_iter().filter(|p| !new.contains(p)).collect())
}

/// Removes the files `pack_files` replaced, and the directories they leave empty.
pub fn remove_replaced(files: &[PathBuf]) -> Result<()> {
    for p in files {
        std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
        if let Some(d) = p.parent() {
            let _ = std::fs::remove_dir(d);
        }
    }
    Ok(())
}
