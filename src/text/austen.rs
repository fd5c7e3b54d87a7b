//! Jane Austen's six novels, decoded from the R package `janeaustenr`
//! (Debian `r-cran-janeaustenr` 1.0.0-1, `data/Rdata.rdb` + `Rdata.rdx`).
//!
//! R stores package data as a "lazy-load database":
//! * `Rdata.rdb` holds records back to back. Each record is a 4-byte
//!   big-endian *uncompressed* length followed by a zlib stream. The stream
//!   inflates to an R serialization (XDR, format 2 or 3) of one object; here
//!   each object is a character vector with one element per line of a novel.
//! * `Rdata.rdx` is a gzip-compressed R serialization of
//!   `list(variables = list(emma = c(offset, len), ...), references, compressed)`
//!   naming every object and where its record lives in the `.rdb`.
//!
//! We parse the index when it is present (it names the objects, so nothing is
//! guessed) and otherwise walk the records and recognise novels by their
//! title line. Either way every novel's title line is checked, and a missing
//! novel is an error.
//!
//! The input is treated as untrusted: every length is checked against the
//! bytes actually left before anything is allocated, recursion is bounded and
//! inflation is capped, so corrupt files give errors rather than panics or
//! huge allocations.

use anyhow::{bail, ensure, Context, Result};
use std::io::Read;
use std::path::Path;

/// One novel: its canonical title and its lines ("" for blank lines).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Novel {
    pub title: String,
    pub lines: Vec<String>,
}

impl Novel {
    /// The novel as plain text: lines joined by "\n" (blank lines kept, so
    /// paragraph breaks survive).
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// The six novels in publication order: (object name in the R package,
/// canonical title). The order is the order `read_austen` returns them in.
pub const NOVELS: [(&str, &str); 6] = [
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
];

/// Read the six novels from an `Rdata.rdb`, using the `Rdata.rdx` beside it
/// when there is one.
pub fn read_austen(rdb_path: &Path) -> Result<Vec<Novel>> {
    let rdb = std::fs::read(rdb_path)
        .with_context(|| format!("reading Austen data {}", rdb_path.display()))?;
    let rdx_path = rdb_path.with_extension("rdx");
    let rdx = if rdx_path.is_file() {
        Some(
            std::fs::read(&rdx_path)
                .with_context(|| format!("reading index {}", rdx_path.display()))?,
        )
    } else {
        None
    };
    read_austen_from_bytes(&rdb, rdx.as_deref()).with_context(|| {
        let idx = match &rdx {
            Some(_) => format!(" (index {})", rdx_path.display()),
            None => " (no .rdx index; records identified by title)".to_string(),
        };
        format!("decoding {}{idx}", rdb_path.display())
    })
}

/// As [`read_austen`], from the bytes of the `.rdb` and (optionally) the
/// gzip-compressed `.rdx` index.
pub fn read_austen_from_bytes(rdb: &[u8], rdx: Option<&[u8]>) -> Result<Vec<Novel>> {
    let mut found: Vec<Option<Vec<String>>> = vec![None; NOVELS.len()];
    match rdx {
        Some(rdx) => {
            let index = parse_rdx(rdx).context("parsing the .rdx index")?;
            for (i, (name, title)) in NOVELS.iter().enumerate() {
                let &(_, off, len) =
                    index.iter().find(|(n, _, _)| n == name).with_context(|| {
                        format!("novel {title:?} (object {name:?}) not in the index")
                    })?;
                let end = off.checked_add(len).filter(|&e| e <= rdb.len());
                let Some(end) = end else {
                    bail!(
                        "index places {name:?} at offset {off} length {len}, \
                         beyond the end of the .rdb ({} bytes)",
                        rdb.len()
                    );
                };
                let (strings, used) = decode_record_strings(&rdb[..end], off)
                    .with_context(|| format!("record {name:?} at .rdb offset {off}"))?;
                ensure!(
                    used == len,
                    "record {name:?} at .rdb offset {off}: index says {len} bytes, \
                     the zlib stream ends after {used}"
                );
                let lines = novel_lines(strings, off)?;
                check_title(&lines, title, off)?;
                found[i] = Some(lines);
            }
        }
        None => {
            // No index: walk the records; the zlib stream tells us where each ends.
            let mut off = 0;
            while off < rdb.len() {
                let (strings, used) = decode_record_strings(rdb, off)
                    .with_context(|| format!("record at .rdb offset {off}"))?;
                let lines = novel_lines(strings, off)?;
                let first = first_nonempty(&lines);
                let Some(i) = NOVELS
                    .iter()
                    .position(|(_, t)| first.eq_ignore_ascii_case(t))
                else {
                    bail!("record at .rdb offset {off}: first line {first:?} is not a known title");
                };
                ensure!(
                    found[i].is_none(),
                    "record at .rdb offset {off}: second copy of {:?}",
                    NOVELS[i].1
                );
                found[i] = Some(lines);
                off += used;
            }
        }
    }
    NOVELS
        .iter()
        .zip(found)
        .map(|((_, title), lines)| {
            let lines = lines.with_context(|| format!("novel {title:?} missing from the .rdb"))?;
            Ok(Novel {
                title: title.to_string(),
                lines,
            })
        })
        .collect()
}

fn first_nonempty(lines: &[String]) -> &str {
    lines
        .iter()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

fn check_title(lines: &[String], title: &str, off: usize) -> Result<()> {
    let first = first_nonempty(lines);
    ensure!(
        first.eq_ignore_ascii_case(title),
        "record at .rdb offset {off} should be {title:?} but its first line is {first:?}"
    );
    Ok(())
}

/// A novel's character vector must have no NA lines (they would be a sign of
/// a different data set, not a text).
fn novel_lines(strings: Vec<Option<String>>, off: usize) -> Result<Vec<String>> {
    strings
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.with_context(|| format!("record at .rdb offset {off}: line {i} is NA")))
        .collect()
}

/// Decode the record starting at `off` in `rdb` as a character vector.
/// Returns its elements (None = NA) and the number of bytes the record
/// occupies (4-byte header + zlib stream), i.e. where the next record starts.
pub fn decode_record_strings(rdb: &[u8], off: usize) -> Result<(Vec<Option<String>>, usize)> {
    let Some(header) = rdb.get(off..).and_then(|r| r.get(..4)) else {
        bail!(
            "truncated record header: need 4 bytes at offset {off}, file has {}",
            rdb.len()
        );
    };
    let declared = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let stream = &rdb[off + 4..];
    // Deflate cannot expand more than ~1032:1, so a larger declared size is
    // corruption; this keeps a flipped length byte from driving allocation.
    ensure!(
        declared <= stream.len().saturating_mul(1032),
        "declared uncompressed size {declared} is impossible for {} compressed bytes",
        stream.len()
    );
    let mut dec = flate2::bufread::ZlibDecoder::new(stream);
    let mut data = Vec::new();
    (&mut dec)
        .take(declared as u64 + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("bad zlib stream at offset {}", off + 4))?;
    ensure!(
        data.len() == declared,
        "zlib stream at offset {} inflates to {}{} bytes, header declares {declared}",
        off + 4,
        if data.len() > declared {
            "more than "
        } else {
            ""
        },
        declared.min(data.len()),
    );
    let used = 4 + dec.total_in() as usize;
    let obj = unserialize(&data).context("decoding the R serialization")?;
    match obj.kind {
        Kind::Str(v) => Ok((v, used)),
        other => bail!("expected a character vector, found {}", other.name()),
    }
}

/// Parse the `.rdx` index into (object name, offset, length) triples.
fn parse_rdx(rdx: &[u8]) -> Result<Vec<(String, usize, usize)>> {
    // The index is a few hundred bytes; 16 MiB is a generous cap on inflation.
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(rdx)
        .take(16 << 20)
        .read_to_end(&mut data)
        .context("bad gzip stream")?;
    let top = unserialize(&data)?;
    let entry = |name: &str| -> Result<&RObj> {
        let Kind::List(items) = &top.kind else {
            bail!("index is a {}, expected a list", top.kind.name());
        };
        let pos = top
            .names()
            .iter()
            .position(|n| n.as_deref() == Some(name))
            .with_context(|| format!("index has no {name:?} entry"))?;
        items.get(pos).context("index names outnumber its elements")
    };
    // compressed = TRUE (or 1) means zlib; 2 and 3 are bzip2 and xz.
    match &entry("compressed")?.kind {
        Kind::Lgl(v) | Kind::Int(v) if v.as_slice() == [1] => {}
        other => bail!("unsupported compression {other:?} (only zlib is supported)"),
    }
    let vars = entry("variables")?;
    let Kind::List(items) = &vars.kind else {
        bail!(
            "index 'variables' is a {}, expected a list",
            vars.kind.name()
        );
    };
    let names = vars.names();
    ensure!(
        names.len() == items.len(),
        "index 'variables' has {} names for {} entries",
        names.len(),
        items.len()
    );
    let mut out = Vec::new();
    for (name, item) in names.into_iter().zip(items) {
        let name = name.context("NA name in the index")?;
        // Offsets are integers, or doubles for databases past 2 GiB.
        let pair: Vec<f64> = match &item.kind {
            Kind::Int(v) => v.iter().map(|&x| x as f64).collect(),
            Kind::Real(v) => v.clone(),
            other => bail!("index entry {name:?} is a {}", other.name()),
        };
        let ok = |x: f64| x >= 0.0 && x.fract() == 0.0 && x < 1e15;
        let [o, l] = pair[..] else {
            bail!(
                "index entry {name:?} has {} numbers, expected 2",
                pair.len()
            );
        };
        ensure!(
            ok(o) && ok(l),
            "index entry {name:?} has bad offset/length {o}/{l}"
        );
        out.push((name, o as usize, l as usize));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// A minimal reader for R's XDR serialization: just the types the data and the
// index use. Anything else is reported as unsupported rather than guessed.

#[derive(Clone, Debug)]
struct RObj {
    kind: Kind,
    attrs: Vec<(String, RObj)>,
}

#[derive(Clone, Debug)]
enum Kind {
    Null,
    Sym(String),
    /// Pairlist: (tag, value) nodes.
    Pairlist(Vec<(Option<String>, RObj)>),
    Str(Vec<Option<String>>),
    /// Logical and integer vectors keep R's NA (i32::MIN) as is.
    Lgl(Vec<i32>),
    Int(Vec<i32>),
    Real(Vec<f64>),
    List(Vec<RObj>),
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Null => "NULL",
            Kind::Sym(_) => "symbol",
            Kind::Pairlist(_) => "pairlist",
            Kind::Str(_) => "character vector",
            Kind::Lgl(_) => "logical vector",
            Kind::Int(_) => "integer vector",
            Kind::Real(_) => "double vector",
            Kind::List(_) => "list",
        }
    }
}

impl RObj {
    fn names(&self) -> Vec<Option<String>> {
        for (k, v) in &self.attrs {
            if let (true, Kind::Str(n)) = (k == "names", &v.kind) {
                return n.clone();
            }
        }
        Vec::new()
    }
}

// SEXP type codes from R's Rinternals.h / serialize.c.
const SYMSXP: i32 = 1;
const LISTSXP: i32 = 2;
const CHARSXP: i32 = 9;
const LGLSXP: i32 = 10;
const INTSXP: i32 = 13;
const REALSXP: i32 = 14;
const STRSXP: i32 = 16;
const VECSXP: i32 = 19;
const REFSXP: i32 = 255;
const NILVALUE_SXP: i32 = 254;
// Flag bits of an item header.
const HAS_ATTR: i32 = 1 << 9;
const HAS_TAG: i32 = 1 << 10;
// CHARSXP encoding bits (in the "levels" field, flags >> 12).
const LEVEL_BYTES: i32 = 1 << 1;
const LEVEL_LATIN1: i32 = 1 << 2;
const LEVEL_UTF8: i32 = 1 << 3;
const MAX_DEPTH: usize = 64;

struct Xdr<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Symbols seen so far; REFSXP refers back to them by 1-based index.
    refs: Vec<String>,
    native_latin1: bool,
    depth: usize,
}

/// Decode one serialized object ("X\n" XDR format, versions 2 and 3).
fn unserialize(buf: &[u8]) -> Result<RObj> {
    let mut r = Xdr {
        buf,
        pos: 0,
        refs: Vec::new(),
        native_latin1: false,
        depth: 0,
    };
    match buf.get(..2) {
        Some(b"X\n") => {}
        Some(b"A\n") | Some(b"B\n") => bail!("ASCII/native R serialization is not supported"),
        _ => bail!(
            "wrong magic {:?}: not an XDR R serialization",
            &buf[..buf.len().min(2)]
        ),
    }
    r.pos = 2;
    let version = r.int()?;
    ensure!(
        version == 2 || version == 3,
        "unsupported serialization version {version}"
    );
    let _writer_version = r.int()?;
    let _min_reader_version = r.int()?;
    if version == 3 {
        let n = r.len_bytes()?;
        let enc = String::from_utf8_lossy(r.bytes(n)?).to_ascii_lowercase();
        r.native_latin1 = matches!(enc.as_str(), "latin1" | "iso-8859-1" | "iso8859-1");
    }
    let obj = r.item()?;
    ensure!(
        r.pos == buf.len(),
        "{} trailing bytes after the object",
        buf.len() - r.pos
    );
    Ok(obj)
}

impl Xdr<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8]> {
        ensure!(
            n <= self.remaining(),
            "truncated: need {n} bytes at byte {} of {}",
            self.pos,
            self.buf.len()
        );
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn int(&mut self) -> Result<i32> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A byte count: must be non-negative and fit in what is left.
    fn len_bytes(&mut self) -> Result<usize> {
        let at = self.pos;
        let n = self.int()?;
        ensure!(
            n >= 0 && n as usize <= self.remaining(),
            "bad length {n} at byte {at} ({} bytes left)",
            self.remaining()
        );
        Ok(n as usize)
    }

    /// A vector length (with R's long-vector escape), capped so that
    /// `n * min_size` bytes must actually remain: garbage can't make us
    /// allocate more than the input could fill.
    fn vec_len(&mut self, min_size: usize) -> Result<usize> {
        let at = self.pos;
        let n = match self.int()? {
            -1 => {
                let hi = self.int()? as u32 as u64;
                let lo = self.int()? as u32 as u64;
                (hi << 32) | lo
            }
            n if n < 0 => bail!("negative vector length {n} at byte {at}"),
            n => n as u64,
        };
        let left = (self.remaining() / min_size) as u64;
        ensure!(
            n <= left,
            "vector length {n} at byte {at} exceeds what the {} remaining bytes can hold",
            self.remaining()
        );
        Ok(n as usize)
    }

    fn item(&mut self) -> Result<RObj> {
        ensure!(
            self.depth < MAX_DEPTH,
            "objects nested deeper than {MAX_DEPTH}"
        );
        self.depth += 1;
        let r = self.item_inner();
        self.depth -= 1;
        r
    }

    fn item_inner(&mut self) -> Result<RObj> {
        let at = self.pos;
        let flags = self.int()?;
        let ty = flags & 0xff;
        let plain = |kind| RObj {
            kind,
            attrs: Vec::new(),
        };
        let kind = match ty {
            NILVALUE_SXP => return Ok(plain(Kind::Null)),
            REFSXP => {
                let idx = match flags >> 8 {
                    0 => self.int()?,
                    i => i,
                };
                let name = usize::try_from(idx)
                    .ok()
                    .and_then(|i| i.checked_sub(1))
                    .and_then(|i| self.refs.get(i))
                    .with_context(|| format!("bad reference {idx} at byte {at}"))?;
                return Ok(plain(Kind::Sym(name.clone())));
            }
            SYMSXP => {
                let at = self.pos;
                let f = self.int()?;
                ensure!(f & 0xff == CHARSXP, "symbol at byte {at} has no name");
                let name = self
                    .charsxp(f)?
                    .with_context(|| format!("NA symbol name at byte {at}"))?;
                self.refs.push(name.clone());
                return Ok(plain(Kind::Sym(name)));
            }
            LISTSXP => return self.pairlist(flags),
            CHARSXP => Kind::Str(vec![self.charsxp(flags)?]),
            STRSXP => {
                let n = self.vec_len(8)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let at = self.pos;
                    let f = self.int()?;
                    ensure!(
                        f & 0xff == CHARSXP,
                        "string element at byte {at} has type {}, expected CHARSXP",
                        f & 0xff
                    );
                    v.push(self.charsxp(f)?);
                }
                Kind::Str(v)
            }
            LGLSXP | INTSXP => {
                let n = self.vec_len(4)?;
                let v = (0..n).map(|_| self.int()).collect::<Result<Vec<_>>>()?;
                if ty == LGLSXP {
                    Kind::Lgl(v)
                } else {
                    Kind::Int(v)
                }
            }
            REALSXP => {
                let n = self.vec_len(8)?;
                let b = self.bytes(n * 8)?;
                Kind::Real(
                    b.chunks_exact(8)
                        .map(|c| f64::from_be_bytes(c.try_into().unwrap()))
                        .collect(),
                )
            }
            VECSXP => {
                let n = self.vec_len(4)?;
                let v = (0..n).map(|_| self.item()).collect::<Result<Vec<_>>>()?;
                Kind::List(v)
            }
            t => bail!("unsupported SEXP type {t} at byte {at}"),
        };
        // Vectors carry their attributes after the data.
        let attrs = if flags & HAS_ATTR != 0 {
            self.attributes()?
        } else {
            Vec::new()
        };
        Ok(RObj { kind, attrs })
    }

    /// A pairlist node chain; iterative along CDR so long lists can't
    /// exhaust the stack.
    fn pairlist(&mut self, mut flags: i32) -> Result<RObj> {
        let mut nodes = Vec::new();
        let mut attrs = Vec::new();
        loop {
            if flags & HAS_ATTR != 0 {
                let a = self.attributes()?;
                if nodes.is_empty() {
                    attrs = a;
                }
            }
            let tag = if flags & HAS_TAG != 0 {
                let at = self.pos;
                match self.item()?.kind {
                    Kind::Sym(s) => Some(s),
                    other => bail!("pairlist tag at byte {at} is a {}", other.name()),
                }
            } else {
                None
            };
            nodes.push((tag, self.item()?));
            let at = self.pos;
            flags = self.int()?;
            match flags & 0xff {
                LISTSXP => continue,
                NILVALUE_SXP => break,
                t => bail!("pairlist continues with type {t} at byte {at}"),
            }
        }
        Ok(RObj {
            kind: Kind::Pairlist(nodes),
            attrs,
        })
    }

    fn attributes(&mut self) -> Result<Vec<(String, RObj)>> {
        let at = self.pos;
        match self.item()?.kind {
            Kind::Pairlist(nodes) => nodes
                .into_iter()
                .map(|(t, v)| {
                    Ok((
                        t.with_context(|| format!("untagged attribute at byte {at}"))?,
                        v,
                    ))
                })
                .collect(),
            other => bail!("attributes at byte {at} are a {}", other.name()),
        }
    }

    /// The body of a CHARSXP whose flags were already read. None = NA.
    fn charsxp(&mut self, flags: i32) -> Result<Option<String>> {
        let at = self.pos;
        let n = self.int()?;
        if n == -1 {
            return Ok(None);
        }
        ensure!(
            n >= 0 && n as usize <= self.remaining(),
            "bad string length {n} at byte {at} ({} bytes left)",
            self.remaining()
        );
        let levels = flags >> 12;
        let latin1 = levels & LEVEL_LATIN1 != 0
            || (self.native_latin1 && levels & (LEVEL_UTF8 | LEVEL_BYTES) == 0);
        let bytes = self.bytes(n as usize)?;
        let s = if latin1 {
            bytes.iter().map(|&b| b as char).collect()
        } else if levels & LEVEL_BYTES != 0 {
            String::from_utf8_lossy(bytes).into_owned()
        } else {
            String::from_utf8(bytes.to_vec())
                .map_err(|e| anyhow::anyhow!("invalid UTF-8 in string at byte {at}: {e}"))?
        };
        Ok(Some(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xdr_header() -> Vec<u8> {
        let mut v = b"X\n".to_vec();
        for x in [3, 0x040201, 0x030500, 5] {
            v.extend_from_slice(&i32::to_be_bytes(x));
        }
        v.extend_from_slice(b"UTF-8");
        v
    }

    #[test]
    fn charsxp_encodings() {
        let mut v = xdr_header();
        v.extend_from_slice(&(STRSXP).to_be_bytes());
        v.extend_from_slice(&3i32.to_be_bytes());
        // UTF-8 flagged "é", latin1 flagged "é", NA.
        v.extend_from_slice(&(CHARSXP | (LEVEL_UTF8 << 12)).to_be_bytes());
        v.extend_from_slice(&2i32.to_be_bytes());
        v.extend_from_slice("é".as_bytes());
        v.extend_from_slice(&(CHARSXP | (LEVEL_LATIN1 << 12)).to_be_bytes());
        v.extend_from_slice(&1i32.to_be_bytes());
        v.push(0xe9);
        v.extend_from_slice(&CHARSXP.to_be_bytes());
        v.extend_from_slice(&(-1i32).to_be_bytes());
        let obj = unserialize(&v).unwrap();
        let Kind::Str(s) = obj.kind else { panic!() };
        assert_eq!(s, vec![Some("é".into()), Some("é".into()), None]);
    }

    #[test]
    fn absurd_lengths_are_errors() {
        let mut v = xdr_header();
        v.extend_from_slice(&STRSXP.to_be_bytes());
        v.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(unserialize(&v).is_err());
        let mut v = xdr_header();
        v.extend_from_slice(&VECSXP.to_be_bytes());
        v.extend_from_slice(&(-1i32).to_be_bytes());
        v.extend_from_slice(&[0xff; 8]);
        assert!(unserialize(&v).is_err());
    }

    #[test]
    fn deep_nesting_is_an_error() {
        let mut v = xdr_header();
        for _ in 0..10_000 {
            v.extend_from_slice(&VECSXP.to_be_bytes());
            v.extend_from_slice(&1i32.to_be_bytes());
        }
        v.extend_from_slice(&NILVALUE_SXP.to_be_bytes());
        let e = unserialize(&v).unwrap_err().to_string();
        assert!(e.contains("nested"), "{e}");
    }
}
