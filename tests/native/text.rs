//! Tests for `flexquant::text`: synthetic R lazy-load databases (valid,
//! corrupt and fuzzed), Brown detokenization, the corpus split, and the real
//! data when `./build.sh setup` has fetched it.

use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use flexquant::text::austen::{self, read_austen, read_austen_from_bytes, Novel, NOVELS};
use flexquant::text::brown::{
    brown_files, detokenize, is_heldout, read_brown, read_brown_split, strip_tag, tagged_to_text,
};
use flexquant::text::{split_austen, write_corpora, AUSTEN_RDB, BROWN_DIR};
use std::io::Write;
use std::path::{Path, PathBuf};

// ---- building R serializations by hand --------------------------------------

fn int(v: &mut Vec<u8>, x: i32) {
    v.extend_from_slice(&x.to_be_bytes());
}

/// "X\n", format 3, R 4.2.1 writer, R 3.5.0 min reader, native encoding UTF-8.
fn header() -> Vec<u8> {
    let mut v = b"X\n".to_vec();
    for x in [3, 0x040201, 0x030500, 5] {
        int(&mut v, x);
    }
    v.extend_from_slice(b"UTF-8");
    v
}

fn charsxp(v: &mut Vec<u8>, s: &str) {
    // 0x40009: CHARSXP with the ASCII level, as R writes plain strings.
    int(v, if s.is_ascii() { 0x40009 } else { 0x8009 });
    int(v, s.len() as i32);
    v.extend_from_slice(s.as_bytes());
}

fn strsxp(v: &mut Vec<u8>, items: &[&str], flags: i32) {
    int(v, flags);
    int(v, items.len() as i32);
    for s in items {
        charsxp(v, s);
    }
}

fn serialize_lines(lines: &[&str]) -> Vec<u8> {
    let mut v = header();
    strsxp(&mut v, lines, 16);
    v
}

/// An .rdb record: 4-byte big-endian uncompressed length, then zlib.
fn record(payload: &[u8]) -> Vec<u8> {
    let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
    z.write_all(payload).unwrap();
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend(z.finish().unwrap());
    v
}

fn tiny_novel(title: &str) -> Vec<String> {
    vec![
        title.to_uppercase(),
        String::new(),
        "By Jane Austen".into(),
        String::new(),
        format!("The first line of {title}, é."),
        "and the second.".into(),
    ]
}

/// A synthetic .rdb holding the six tiny novels in `order` (indices into
/// NOVELS), plus the matching .rdx index.
fn synthetic(order: &[usize]) -> (Vec<u8>, Vec<u8>) {
    let mut rdb = Vec::new();
    let mut entries = Vec::new();
    for &i in order {
        let (name, title) = NOVELS[i];
        let lines = tiny_novel(title);
        let lines: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
        let rec = record(&serialize_lines(&lines));
        entries.push((name, rdb.len() as i32, rec.len() as i32));
        rdb.extend(rec);
    }
    (rdb, rdx(&entries))
}

/// The .rdx: gzip(serialize(list(variables = list(name = c(off, len), ...),
/// references = list(), compressed = TRUE))), with the `names` symbol written
/// once and then referenced (REFSXP), as R does.
fn rdx(entries: &[(&str, i32, i32)]) -> Vec<u8> {
    let mut v = header();
    int(&mut v, 19 | 1 << 9); // VECSXP with attributes
    int(&mut v, 3);
    int(&mut v, 19 | 1 << 9); // variables
    int(&mut v, entries.len() as i32);
    for &(_, off, len) in entries {
        int(&mut v, 13); // INTSXP
        int(&mut v, 2);
        int(&mut v, off);
        int(&mut v, len);
    }
    let names: Vec<&str> = entries.iter().map(|e| e.0).collect();
    int(&mut v, 2 | 1 << 10); // pairlist node with tag
    int(&mut v, 1); // SYMSXP "names" (becomes reference 1)
    charsxp(&mut v, "names");
    strsxp(&mut v, &names, 16);
    int(&mut v, 254);
    int(&mut v, 19); // references = list()
    int(&mut v, 0);
    int(&mut v, 10); // compressed = TRUE
    int(&mut v, 1);
    int(&mut v, 1);
    int(&mut v, 2 | 1 << 10); // names of the top list
    int(&mut v, 0x1ff); // REFSXP 1 = "names"
    strsxp(&mut v, &["variables", "references", "compressed"], 16);
    int(&mut v, 254);
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&v).unwrap();
    gz.finish().unwrap()
}

fn check_tiny(novels: &[Novel]) {
    assert_eq!(novels.len(), 6);
    for (n, (_, title)) in novels.iter().zip(NOVELS) {
        assert_eq!(n.title, title);
        assert_eq!(n.lines, tiny_novel(title));
        assert!(n.text().contains("\n\nBy Jane Austen\n\n"));
    }
}

// ---- Austen: synthetic ------------------------------------------------------

#[test]
fn synthetic_rdb_decodes_with_and_without_index() {
    let order = [3, 2, 4, 5, 1, 0]; // the package's alphabetical order
    let (rdb, rdx) = synthetic(&order);
    check_tiny(&read_austen_from_bytes(&rdb, Some(&rdx)).unwrap());
    check_tiny(&read_austen_from_bytes(&rdb, None).unwrap());
}

#[test]
fn read_austen_uses_index_file_beside_rdb() {
    let (rdb, rdx) = synthetic(&[0, 1, 2, 3, 4, 5]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Rdata.rdb"), &rdb).unwrap();
    check_tiny(&read_austen(&dir.path().join("Rdata.rdb")).unwrap());
    std::fs::write(dir.path().join("Rdata.rdx"), &rdx).unwrap();
    check_tiny(&read_austen(&dir.path().join("Rdata.rdb")).unwrap());
    // A missing file names the path.
    let e = read_austen(&dir.path().join("nope.rdb")).unwrap_err();
    assert!(format!("{e:#}").contains("nope.rdb"), "{e:#}");
}

#[test]
fn missing_novel_is_named() {
    let (rdb, rdx) = synthetic(&[0, 2, 3, 4, 5]);
    for idx in [Some(rdx.as_slice()), None] {
        let e = format!("{:#}", read_austen_from_bytes(&rdb, idx).unwrap_err());
        assert!(e.contains("Pride and Prejudice"), "{e}");
    }
}

#[test]
fn index_pointing_at_wrong_novel_is_an_error() {
    let (rdb, _) = synthetic(&[0, 1, 2, 3, 4, 5]);
    // Swap the offsets of the first two entries.
    let mut entries = Vec::new();
    let mut off = 0;
    while off < rdb.len() {
        let (_, used) = austen::decode_record_strings(&rdb, off).unwrap();
        entries.push((off as i32, used as i32));
        off += used;
    }
    entries.swap(0, 1);
    let named: Vec<_> = NOVELS
        .iter()
        .zip(&entries)
        .map(|(&(n, _), &(o, l))| (n, o, l))
        .collect();
    let e = format!(
        "{:#}",
        read_austen_from_bytes(&rdb, Some(&rdx(&named))).unwrap_err()
    );
    assert!(e.contains("first line"), "{e}");
}

fn err_of(rdb: &[u8]) -> String {
    format!("{:#}", read_austen_from_bytes(rdb, None).unwrap_err())
}

#[test]
fn malformed_records_give_clear_errors() {
    let (good, _) = synthetic(&[0, 1, 2, 3, 4, 5]);

    let e = err_of(&good[..2]);
    assert!(
        e.contains("truncated record header") && e.contains("offset 0"),
        "{e}"
    );

    let mut bad = good.clone();
    bad[6] ^= 0xff; // inside the first zlib stream
    let e = err_of(&bad);
    assert!(e.contains("offset 0"), "{e}");

    let e = err_of(&good[..good.len() - 10]); // last stream cut short
    assert!(e.contains("record at .rdb offset"), "{e}");

    let mut bad = good.clone();
    bad[..4].copy_from_slice(&u32::MAX.to_be_bytes()); // absurd declared size
    let e = err_of(&bad);
    assert!(e.contains("impossible"), "{e}");

    let mut p = serialize_lines(&["SENSE AND SENSIBILITY"]);
    p[0] = b'Y';
    let e = err_of(&record(&p));
    assert!(e.contains("wrong magic"), "{e}");

    let mut p = header();
    int(&mut p, 3); // CLOSXP
    let e = err_of(&record(&p));
    assert!(e.contains("unsupported SEXP type 3"), "{e}");

    let mut p = header();
    int(&mut p, 16);
    int(&mut p, 1_000_000_000); // far more strings than bytes left
    let e = err_of(&record(&p));
    assert!(e.contains("vector length 1000000000"), "{e}");

    let mut p = header();
    int(&mut p, 16);
    int(&mut p, 1);
    int(&mut p, 0x40009);
    int(&mut p, -7);
    let e = err_of(&record(&p));
    assert!(e.contains("bad string length -7"), "{e}");

    let mut p = serialize_lines(&["EMMA"]);
    p.push(0);
    let e = err_of(&record(&p));
    assert!(e.contains("trailing"), "{e}");
}

/// xorshift64*: a deterministic, dependency-free source of fuzz positions.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn fuzzed_inputs_never_panic() {
    let (rdb, rdx) = synthetic(&[0, 1, 2, 3, 4, 5]);
    // Uncompressed payloads too, so flips reach the XDR parser rather than
    // just failing the zlib checksum.
    let payload = serialize_lines(&["PRIDE AND PREJUDICE", "", "x"]);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut errors = 0;
    for round in 0..6000 {
        let (base, which) = match round % 3 {
            0 => (&rdb, 0),
            1 => (&rdx, 1),
            _ => (&payload, 2),
        };
        let mut data = base.clone();
        if rng.below(2) == 0 {
            data.truncate(rng.below(data.len()));
        } else {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
        }
        let result = match which {
            0 => read_austen_from_bytes(&data, Some(&rdx)).map(|_| ()),
            1 => read_austen_from_bytes(&rdb, Some(&data)).map(|_| ()),
            _ => read_austen_from_bytes(&record(&data), None).map(|_| ()),
        };
        errors += result.is_err() as usize;
    }
    assert!(errors > 3000, "only {errors} of 6000 corruptions detected");
}

// ---- split and files ----------------------------------------------------------

#[test]
fn split_is_disjoint_and_ordered() {
    let (rdb, rdx) = synthetic(&[0, 1, 2, 3, 4, 5]);
    let novels = read_austen_from_bytes(&rdb, Some(&rdx)).unwrap();
    let (calib, held) = split_austen(&novels).unwrap();
    assert!(held.starts_with("PRIDE AND PREJUDICE\n"));
    assert!(!calib.contains("PRIDE AND PREJUDICE"));
    assert!(!calib.contains("Pride and Prejudice"));
    let order: Vec<usize> = ["SENSE AND", "MANSFIELD", "EMMA", "NORTHANGER", "PERSUASION"]
        .iter()
        .map(|t| calib.find(t).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    // Novels separated by exactly one blank line; files end with one newline.
    assert!(calib.contains("and the second.\n\nMANSFIELD PARK\n"));
    assert!(calib.ends_with("second.\n") && held.ends_with("second.\n"));
}

#[test]
fn write_corpora_is_atomic_and_idempotent() {
    let cache = tempfile::tempdir().unwrap();
    let (rdb, rdx) = synthetic(&[0, 1, 2, 3, 4, 5]);
    let rdb_path = cache.path().join(AUSTEN_RDB);
    std::fs::create_dir_all(rdb_path.parent().unwrap()).unwrap();
    std::fs::write(&rdb_path, rdb).unwrap();
    std::fs::write(rdb_path.with_extension("rdx"), rdx).unwrap();
    let out = cache.path().join("out");

    let files = write_corpora(cache.path(), &out).unwrap();
    assert!(files.brown.is_none());
    assert!(!out.join("brown-calib.txt").exists());
    let held = std::fs::read_to_string(out.join("austen-heldout.txt")).unwrap();
    assert_eq!(files.heldout.bytes, held.len() as u64);
    assert_eq!(files.heldout.lines, 6);
    assert_eq!(files.calibration.lines, 5 * 6 + 4);

    let brown = cache.path().join(BROWN_DIR);
    std::fs::create_dir_all(&brown).unwrap();
    std::fs::write(brown.join("ca01"), "\n\n\tHello/uh ,/, world/nn ./.\n").unwrap();
    std::fs::write(brown.join("ca05"), "\n\n\tHeld/vbn out/rp ./.\n").unwrap();
    let mtime = |p: PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = mtime(out.join("austen-calib.txt"));
    let again = write_corpora(cache.path(), &out).unwrap();
    assert_eq!(again.calibration, files.calibration);
    assert_eq!(
        mtime(out.join("austen-calib.txt")),
        before,
        "unchanged file rewritten"
    );
    let (b, h) = again.brown.unwrap();
    assert_eq!(std::fs::read_to_string(&b.path).unwrap(), "Hello, world.\n");
    assert_eq!(std::fs::read_to_string(&h.path).unwrap(), "Held out.\n");
    // No temporary files left behind.
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
}

// ---- Brown: synthetic ---------------------------------------------------------

#[test]
fn tag_stripping() {
    assert_eq!(strip_tag("The/at"), "The");
    assert_eq!(strip_tag("1-1/2/cd"), "1-1/2");
    assert_eq!(strip_tag("and/or/cc"), "and/or");
    assert_eq!(strip_tag("1/8''/nn"), "1/8''");
    assert_eq!(strip_tag("//cc"), "/");
    assert_eq!(strip_tag("/l//nn"), "/l/");
    assert_eq!(strip_tag("Atlanta's/np$"), "Atlanta's");
    assert_eq!(strip_tag(",/,-hl"), ",");
    assert_eq!(strip_tag("untagged"), "untagged");
}

#[test]
fn detokenization() {
    fn s(words: &str) -> Vec<&str> {
        words.split(' ').collect()
    }
    assert_eq!(
        detokenize(&[
            s("`` Only a handful was received '' , the jury said ."),
            s("Yes !")
        ]),
        "\"Only a handful was received\", the jury said.\nYes!"
    );
    assert_eq!(
        detokenize(&[s("He said ( quietly ) : ' See Joe ' ; then left ?")]),
        "He said (quietly): 'See Joe'; then left?"
    );
    // A closing quote that starts the next line stays with its sentence.
    assert_eq!(
        detokenize(&[s("`` Stop ."), s("''"), s("Then -- silence .")]),
        "\"Stop.\"\nThen -- silence."
    );
}

#[test]
fn brown_files_are_sorted_and_filtered() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cb01"), "\n\n\tSecond/od ./.\n").unwrap();
    std::fs::write(
        dir.path().join("ca01"),
        "\n\n\tFirst/od ./.\n\n\n\tAgain/rb !/.\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("README"), "not/nn corpus/nn").unwrap();
    std::fs::write(dir.path().join("cats.txt"), "ca01 news").unwrap();
    assert_eq!(
        read_brown(dir.path()).unwrap(),
        "First.\n\nAgain!\n\nSecond.\n"
    );
    // Split by document: every fifth of a genre held out; both sides needed.
    std::fs::write(dir.path().join("ca05"), "\n\n\tFifth/od ./.\n").unwrap();
    std::fs::write(dir.path().join("cb10"), "\n\n\tTenth/od ./.\n").unwrap();
    assert_eq!(
        read_brown_split(dir.path()).unwrap(),
        (
            "First.\n\nAgain!\n\nSecond.\n".to_string(),
            "Fifth.\n\nTenth.\n".to_string()
        )
    );
    let only_calib = tempfile::tempdir().unwrap();
    std::fs::write(only_calib.path().join("ca01"), "\n\n\tFirst/od ./.\n").unwrap();
    let e = format!("{:#}", read_brown_split(only_calib.path()).unwrap_err());
    assert!(
        e.contains("documents on both sides (1 calibration, 0 held out)"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let e = format!("{:#}", read_brown(empty.path()).unwrap_err());
    assert!(e.contains("no Brown corpus files"), "{e}");
    assert_eq!(tagged_to_text(""), "");
}

// ---- real data ----------------------------------------------------------------

/// The installed texts (`FLEXQUANT_CACHE`, as every real-data test).
fn cache_dir() -> PathBuf {
    crate::common::cache_dir().join("text")
}

/// Whether a real-data input is there: missing, a failure under `FLEXQUANT_REQUIRE_DATA=1`
/// (`./build.sh test`, CI), else a printed skip.
fn present(path: &Path) -> bool {
    let rel = path
        .strip_prefix(crate::common::cache_dir())
        .unwrap_or(path);
    crate::common::data_file(&rel.to_string_lossy()).is_some()
}

#[test]
fn real_austen() {
    let rdb = cache_dir().join(AUSTEN_RDB);
    if !present(&rdb) {
        return;
    }
    let novels = read_austen(&rdb).unwrap();
    assert_eq!(novels.len(), 6);
    let mut total = 0;
    for n in &novels {
        let chars = n.text().chars().count();
        total += chars;
        println!(
            "{:<24} {:>6} lines {:>8} chars",
            n.title,
            n.lines.len(),
            chars
        );
        assert!(
            n.lines.len() > 5000 && chars > 300_000,
            "{} too small",
            n.title
        );
    }
    println!("total {total} chars");
    assert!((3_800_000..4_600_000).contains(&total), "total {total}");
    let pp = &novels[1];
    assert_eq!(pp.title, "Pride and Prejudice");
    assert_eq!(
        pp.lines.iter().find(|l| !l.is_empty()).unwrap(),
        "PRIDE AND PREJUDICE"
    );
    assert!(pp.text().contains("It is a truth universally acknowledged"));

    // The index and the title-line fallback must agree.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(&rdb, tmp.path().join("Rdata.rdb")).unwrap();
    assert_eq!(read_austen(&tmp.path().join("Rdata.rdb")).unwrap(), novels);

    // Disjoint: no substantial line of the held-out novel is in calibration.
    let (calib, held) = split_austen(&novels).unwrap();
    let calib_lines: std::collections::HashSet<&str> = calib.lines().collect();
    let shared = held
        .lines()
        .filter(|l| l.len() >= 50 && calib_lines.contains(l))
        .count();
    assert_eq!(shared, 0);
    assert!(!calib.contains("It is a truth universally acknowledged"));
    assert!(calib.len() + held.len() >= total);
}

#[test]
fn real_brown() {
    let dir = cache_dir().join(BROWN_DIR);
    if !present(&dir) {
        return;
    }
    let text = read_brown(&dir).unwrap();
    println!(
        "brown: {} chars, {} lines",
        text.chars().count(),
        text.lines().count()
    );
    assert!(text.starts_with(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent \
         primary election produced \"no evidence\" that any irregularities took place.\n"
    ));
    assert!(
        (5_000_000..7_000_000).contains(&text.len()),
        "{}",
        text.len()
    );
    assert!(!text.contains("/at ") && !text.contains("``") && !text.contains(" ,"));
    // Calibration and held-out never share a document: the split is by file, a fifth of
    // every genre held out, and no held-out document's text is in the calibration text.
    let files = brown_files(&dir).unwrap();
    let held: Vec<_> = files.iter().filter(|p| is_heldout(p)).collect();
    // (93 of 500: genres of 6 to 80 documents.)
    assert!(
        (files.len() * 17 / 100..=files.len() / 5).contains(&held.len()),
        "{} of {}",
        held.len(),
        files.len()
    );
    for genre in 'a'..='r' {
        let of = |fs: &mut dyn Iterator<Item = &PathBuf>| {
            fs.filter(|p| p.file_name().unwrap().to_string_lossy().chars().nth(1) == Some(genre))
                .count()
        };
        let (n, h) = (of(&mut files.iter()), of(&mut held.iter().copied()));
        assert!(
            n == 0 || (h > 0 && h < n),
            "genre {genre}: {h} of {n} held out"
        );
    }
    let (calib, heldout) = read_brown_split(&dir).unwrap();
    assert_eq!(calib.len() + heldout.len() + 1, text.len());
    for p in &held {
        let doc = tagged_to_text(&std::fs::read_to_string(p).unwrap());
        let first = doc.lines().next().unwrap();
        assert!(heldout.contains(first), "{}", p.display());
        assert!(
            !calib.contains(doc.as_str()),
            "{} in calibration",
            p.display()
        );
    }
}

#[test]
fn real_write_corpora() {
    let cache = cache_dir();
    if !present(&cache.join(AUSTEN_RDB)) {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let a = write_corpora(&cache, out.path()).unwrap();
    let b = write_corpora(&cache, out.path()).unwrap();
    assert_eq!(a, b);
    let (bc, bh) = a
        .brown
        .as_ref()
        .expect("the Brown corpus is installed with the text");
    for f in [&a.calibration, &a.heldout, bc, bh] {
        println!("{}: {} bytes, {} lines", f.path.display(), f.bytes, f.lines);
        assert_eq!(std::fs::metadata(&f.path).unwrap().len(), f.bytes);
    }
}

// ---- chat-shaped text (`text::chat`) --------------------------------------------

/// Generated chat text is reproducible from its seed, uses the model's template, and its
/// prompts come from the texts given (calibration prompts from calibration splits only).
#[test]
fn generated_chat_is_reproducible_from_its_seed() {
    use flexquant::text::chat::{generate, prompts, ChatSettings};
    let Some((m, _)) = crate::common::demo() else {
        return;
    };
    let calib = std::fs::read_to_string(cache_dir().join("austen-calib.txt")).unwrap();
    let held = std::fs::read_to_string(cache_dir().join("austen-heldout.txt")).unwrap();
    let p = prompts(&[&calib], 2, 1).unwrap();
    assert_eq!(p, prompts(&[&calib], 2, 1).unwrap());
    assert_ne!(p, prompts(&[&calib], 2, 2).unwrap());
    for q in &p {
        let passage = q.split_once("\n\n").unwrap().1;
        let first_words: String = passage.split(' ').take(8).collect::<Vec<_>>().join(" ");
        assert!(
            calib
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .contains(&first_words),
            "{q}"
        );
        assert!(!held.contains(passage), "{q}");
    }
    let s = ChatSettings {
        conversations: 2,
        max_answer_tokens: 12,
        seed: 3,
    };
    let a = generate(&m.weights, &m.tokenizer, &p, s, &mut |_, _| {}).unwrap();
    let b = generate(&m.weights, &m.tokenizer, &p, s, &mut |_, _| {}).unwrap();
    assert_eq!(a, b);
    let c = generate(
        &m.weights,
        &m.tokenizer,
        &p,
        ChatSettings { seed: 4, ..s },
        &mut |_, _| {},
    )
    .unwrap();
    assert_ne!(a, c, "another seed, other answers");
    assert_eq!(a.matches("<|im_start|>assistant\n").count(), 2, "{a}");
    assert!(a.contains(&p[1]), "{a}");
    let e = prompts(&[&calib[..2000]], 50, 1).unwrap_err().to_string();
    assert!(e.contains("50 wanted"), "{e}");
}
