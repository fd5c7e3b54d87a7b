//! An ensemble directory (what `flexquant build` writes, what a static host serves) as the
//! walk's byte source: every file read whole, size-capped and verified against the manifest.

pub use crate::ensemble::files::read_verified;
use crate::ensemble::manifest::{FileRef, Manifest, MAX_MANIFEST_BYTES};
use crate::error::{read_capped, Result};
use crate::runtime::walk::ByteSource;
use std::cell::Cell;
use std::path::{Path, PathBuf};

/// `dir/manifest.json`, validated.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join("manifest.json");
    let bytes = read_capped(&p, MAX_MANIFEST_BYTES as u64)?;
    Manifest::from_bytes(&p.display().to_string(), &bytes)
}

/// The context of a file that could not be read or failed verification: its manifest name.
#[derive(Debug)]
pub struct Unverified(pub String);

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} cannot be used", self.0)
    }
}

pub struct DirSource {
    pub dir: PathBuf,
    manifest: Manifest,
    /// Bytes read so far (what a swap or a rebuild cost in I/O).
    pub bytes_read: Cell<u64>,
}

impl DirSource {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(DirSource {
            manifest: read_manifest(dir)?,
            dir: dir.to_path_buf(),
            bytes_read: Cell::new(0),
        })
    }
}

impl ByteSource for DirSource {
    type Error = anyhow::Error;

    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn unverified_file(e: &anyhow::Error) -> Option<String> {
        e.downcast_ref::<Unverified>().map(|u| u.0.clone())
    }

    async fn files(&self, files: &[FileRef], _phase: &'static str) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            let bytes = read_verified(&self.dir, f)
                .map_err(|e| anyhow::Error::new(e).context(Unverified(f.file.clone())))?;
            out.push(bytes);
            self.bytes_read.set(self.bytes_read.get() + f.bytes);
        }
        Ok(out)
    }
}
