//! An ensemble's files read from a directory: whole, or their slice of a pack
//! (`ensemble::pack`), size-capped and verified against the manifest.

use crate::ensemble::manifest::{FileRef, Manifest};
use crate::error::{read_capped, Error, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The bytes of `f` under `dir`, checked against the manifest (size, then sha256); errors
/// name the file (and the pack it is in).
pub fn read_verified(dir: &Path, f: &FileRef) -> Result<Vec<u8>> {
    let Some(s) = &f.pack else {
        let p = dir.join(&f.file);
        let bytes = read_capped(&p, f.bytes + 1)?;
        Manifest::verify_file(f, &bytes).map_err(|e| Error::format(p.display(), e))?;
        return Ok(bytes);
    };
    let p = dir.join(&s.pack);
    let what = format!("{} (in {} at byte {})", f.file, p.display(), s.offset);
    let mut file = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
    file.seek(SeekFrom::Start(s.offset))
        .map_err(|e| Error::io(&p, e))?;
    let mut bytes = Vec::with_capacity(f.bytes as usize);
    file.take(f.bytes)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(&p, e))?;
    Manifest::verify_file(f, &bytes).map_err(|e| Error::format(&what, e))?;
    Ok(bytes)
}
