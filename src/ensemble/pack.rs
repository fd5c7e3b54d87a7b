//! Packs: an ensemble's files written back to back into a few files, so that a cold load
//! makes a few requests instead of one per file (215 for the demo model, which HTTP/1.1's six
//! connections per host serialize into 36 round trips). Static hosts need no Range requests: a
//! pack is fetched whole and every file in it is verified by its own hash and cached under its
//! own name, so swaps, the cache and `Engine.cached` see files as before.
//!
//! Order: what a walk down the trajectory needs first comes first. The base, the tokenizer and
//! step 0's versions (every module at `n_up`: what a cold load fetches) fill the first packs,
//! the modules swapped out last first; then the lower versions in the order the trajectory
//! swaps them in, so the pack a swap down fetches also holds the next swaps' versions.

use crate::ensemble::files::read_verified;
use crate::ensemble::manifest::{sha256_hex, FileRef, Manifest, Pack, PackSlice};

/// The manifest version that introduced packs.
pub const PACK_VERSION: u32 = 2;
use crate::error::{Error, Result};
use crate::model::weights::ModuleId;
use std::path::{Path, PathBuf};

/// The largest pack by default (`--pack-mb`).
pub const DEFAULT_PACK_MB: f64 = 32.0;
/// A cold load's files (tokenizer, base, step 0's versions) are cut into at least this many
/// packs of about equal size. Measured in headless Chromium through the test server with
/// 50 ms added to every response (`bench-latency.html`, medians of 5 in one run, 91.5 MB
/// after a 1 kB request like the manifest): one file 0.36-0.42 s, 2 files 0.41-0.43 s,
/// 3 files 0.36-0.44 s, 4 files 0.41-0.43 s, 6 files 0.63-0.65 s, against 0.32-0.34 s for
/// the same bytes alone. Earlier layouts measured on the demo: the base plus 4 packs of
/// 15 MB (six requests) 0.42-0.51 s, plus 8 of 7.5 MB 0.45-0.73 s, plus 16 of 3.8 MB
/// 0.60-0.83 s.
pub const FIRST_LOAD_PACKS: u64 = 3;
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

/// A file of an ensemble that a pack can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Member {
    Tokenizer,
    Base,
    /// An index into `Manifest::modules`.
    Module(usize),
}

impl Member {
    pub fn file(self, m: &Manifest) -> &FileRef {
        match self {
            Member::Tokenizer => &m.tokenizer,
            Member::Base => &m.base,
            Member::Module(i) => &m.modules[i].file,
        }
    }

    pub fn file_mut(self, m: &mut Manifest) -> &mut FileRef {
        match self {
            Member::Tokenizer => &mut m.tokenizer,
            Member::Base => &mut m.base,
            Member::Module(i) => &mut m.modules[i].file,
        }
    }
}

/// The ensemble's files in first-use order, cut into packs of at most `max` bytes (a file
/// bigger than that gets a pack of its own): the base, the tokenizer and step 0's versions
/// (what a cold load fetches) into `FIRST_LOAD_PACKS` packs of about equal size, more if they
/// would exceed `max`; the lower versions into packs of `SWAP_PACK_BYTES` (or `max` if
/// smaller). A cold load's files never share a pack with lower versions.
pub fn plan(m: &Manifest, max: u64) -> Vec<Vec<Member>> {
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
    // A bit-plane file serves every version of its module: packed once, where the first of
    // them is needed.
    let mut names = std::collections::HashSet::new();
    let mut take = |k: &(usize, u32)| {
        let i = *index.get(k)?;
        let first = !std::mem::replace(&mut seen[i], true);
        (first && names.insert(m.modules[i].file.file.as_str())).then_some(Member::Module(i))
    };
    // The base first: the runtime starts a file's digest once its last byte arrives, and
    // the base is the largest file to hash.
    let first: Vec<Member> = [Member::Base, Member::Tokenizer]
        .into_iter()
        .chain(modules.iter().filter_map(|&i| take(&(i, m.n_up))))
        .collect();
    let low: Vec<Member> = order_low.iter().filter_map(&mut take).collect();
    // Versions the trajectory never swaps in (none in a valid manifest, kept all the same).
    let rest: Vec<Member> = (0..m.modules.len())
        .filter(|&i| !seen[i])
        .filter(|&i| names.insert(m.modules[i].file.file.as_str()))
        .map(Member::Module)
        .collect();
    let first_bytes: u64 = first.iter().map(|f| f.file(m).bytes).sum();
    let n_first = FIRST_LOAD_PACKS.max(first_bytes.div_ceil(max.max(1)));
    let swap = SWAP_PACK_BYTES.min(max);
    let mut packs = Vec::new();
    for (group, target) in [
        (first, first_bytes.div_ceil(n_first)),
        (low, swap),
        (rest, swap),
    ] {
        // Cut at the file boundary nearest each multiple of `target` (where a file's middle
        // crosses it), so `n` targets' worth of files make `n` packs.
        let target = target.max(1);
        let (mut cur, mut done, mut next) = (Vec::new(), 0, target);
        for f in group {
            let b = f.file(m).bytes;
            let middle = done + b / 2;
            if middle >= next {
                if !cur.is_empty() {
                    packs.push(std::mem::take(&mut cur));
                }
                next = (middle / target + 1) * target;
            }
            cur.push(f);
            done += b;
        }
        if !cur.is_empty() {
            packs.push(cur);
        }
    }
    packs
}

/// Packs the files of the ensemble in `dir` (one file each, or packs of another layout) into
/// `packs/*.bin` named by their content's hash, updating `m` (now version 2). Every file is
/// verified before it is packed. Returns the files the new packs replace, which the caller
/// removes once it has written the manifest.
pub fn pack_files(dir: &Path, m: &mut Manifest, max: u64) -> Result<Vec<PathBuf>> {
    if max == 0 {
        return Err(Error::input("a pack size of 0 bytes"));
    }
    // Where the files are now: their own files, or old packs.
    let old: std::collections::BTreeSet<PathBuf> = m
        .all_files()
        .map(|f| dir.join(f.pack.as_ref().map_or(&f.file, |s| &s.pack)))
        .collect();
    let plan = plan(m, max);
    let out = dir.join(DIR);
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let mut packs = Vec::with_capacity(plan.len());
    let mut slices = Vec::with_capacity(m.modules.len());
    for members in &plan {
        let mut bytes = Vec::new();
        for &f in members {
            // Read where the file is now (its own file or an old pack, never a new one).
            slices.push((f, bytes.len() as u64));
            bytes.extend(read_verified(dir, f.file(m))?);
        }
        let name = format!("{DIR}/{}.bin", &sha256_hex(&bytes)[..16]);
        let p = dir.join(&name);
        std::fs::write(&p, &bytes).map_err(|e| Error::io(&p, e))?;
        for &(f, offset) in &slices[slices.len() - members.len()..] {
            let slice = PackSlice {
                pack: name.clone(),
                offset,
            };
            // Every version naming the file (the versions of a bit-plane file) points at it.
            let file = f.file(m).file.clone();
            for v in m.modules.iter_mut().filter(|v| v.file.file == file) {
                v.file.pack = Some(slice.clone());
            }
            f.file_mut(m).pack = Some(slice);
        }
        packs.push(Pack {
            file: name,
            bytes: bytes.len() as u64,
        });
    }
    let new: std::collections::HashSet<PathBuf> = packs.iter().map(|p| dir.join(&p.file)).collect();
    m.packs = packs;
    m.version = m.version.max(PACK_VERSION);
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
