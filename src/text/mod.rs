//! Real English text for quantization calibration and perplexity evaluation.
//!
//! The splits are fixed and disjoint by construction, by document: *Pride and Prejudice* is
//! held out whole for evaluation, and the other five Austen novels (in publication order) are
//! calibration text; the Brown corpus (when present: a second domain, 15 genres of 1961
//! American prose) is split the same way, a fifth of every genre's documents held out
//! (`brown::HELDOUT_EVERY`).

pub mod austen;
pub mod brown;
pub mod chat;

use anyhow::{ensure, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The held-out novel; everything else is calibration.
pub const HELDOUT_TITLE: &str = "Pride and Prejudice";

/// Where the Debian package puts the data, relative to the text cache dir.
pub const AUSTEN_RDB: &str = "deb/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb";
/// Where the npm package was extracted, relative to the text cache dir.
pub const BROWN_DIR: &str = "brown/package";

#[derive(Clone, Debug)]
pub struct Corpora {
    pub calibration: String,
    pub heldout: String,
    /// Brown calibration and held-out text.
    pub brown: Option<(String, String)>,
}

/// One written corpus file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStats {
    pub path: PathBuf,
    pub bytes: u64,
    pub lines: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CorporaFiles {
    pub calibration: FileStats,
    pub heldout: FileStats,
    /// `brown-calib.txt` and `brown-heldout.txt`.
    pub brown: Option<(FileStats, FileStats)>,
}

/// Split novels into calibration and held-out text. Novels are separated by a
/// blank line; both texts end with a single newline.
pub fn split_austen(novels: &[austen::Novel]) -> Result<(String, String)> {
    let held: Vec<_> = novels.iter().filter(|n| n.title == HELDOUT_TITLE).collect();
    ensure!(
        held.len() == 1,
        "expected exactly one {HELDOUT_TITLE:?}, found {}",
        held.len()
    );
    let calib: Vec<String> = novels
        .iter()
        .filter(|n| n.title != HELDOUT_TITLE)
        .map(|n| n.text().trim_end().to_string())
        .collect();
    ensure!(!calib.is_empty(), "no calibration novels");
    let heldout = format!("{}\n", held[0].text().trim_end());
    let calibration = format!("{}\n", calib.join("\n\n"));
    Ok((calibration, heldout))
}

/// Load the corpora from the text cache: Austen is required, Brown optional
/// (None when `<text_cache_dir>/brown/package` does not exist).
pub fn load_corpora(text_cache_dir: &Path) -> Result<Corpora> {
    let novels = austen::read_austen(&text_cache_dir.join(AUSTEN_RDB))?;
    let (calibration, heldout) = split_austen(&novels)?;
    let brown_dir = text_cache_dir.join(BROWN_DIR);
    let brown = if brown_dir.is_dir() {
        Some(brown::read_brown_split(&brown_dir)?)
    } else {
        None
    };
    Ok(Corpora {
        calibration,
        heldout,
        brown,
    })
}

/// Write `austen-calib.txt`, `austen-heldout.txt` and (if the Brown corpus is present)
/// `brown-calib.txt` and `brown-heldout.txt` into `out_dir`. Each file is written to a temporary
/// name and renamed, so readers never see a partial file; a file whose
/// content is already right is left untouched, so reruns are no-ops.
pub fn write_corpora(text_cache_dir: &Path, out_dir: &Path) -> Result<CorporaFiles> {
    let c = load_corpora(text_cache_dir)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    Ok(CorporaFiles {
        calibration: write_atomic(&out_dir.join("austen-calib.txt"), &c.calibration)?,
        heldout: write_atomic(&out_dir.join("austen-heldout.txt"), &c.heldout)?,
        brown: match &c.brown {
            Some((calib, held)) => Some((
                write_atomic(&out_dir.join("brown-calib.txt"), calib)?,
                write_atomic(&out_dir.join("brown-heldout.txt"), held)?,
            )),
            None => None,
        },
    })
}

fn write_atomic(path: &Path, text: &str) -> Result<FileStats> {
    let stats = FileStats {
        path: path.to_path_buf(),
        bytes: text.len() as u64,
        lines: text.lines().count(),
    };
    if std::fs::read(path).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(stats);
    }
    let name = path.file_name().context("output path has no file name")?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))?;
    Ok(stats)
}
