//! Bad input never panics and always names what and where: fuzzed GGUF headers, corrupt
//! safetensors, malformed configs, and bad CLI arguments.

use crate::common;

use flexquant::model::gguf::Gguf;
use flexquant::model::load::{load, load_gguf_bytes};
use flexquant::runtime::generate::Rng;
use std::path::Path;
use std::process::Command;

/// A minimal GGUF v3 writer for synthetic files.
struct GgufWriter(Vec<u8>);

impl GgufWriter {
    fn str(&mut self, s: &str) {
        self.0.extend((s.len() as u64).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn kv_u32(&mut self, k: &str, v: u32) {
        self.str(k);
        self.0.extend(4u32.to_le_bytes());
        self.0.extend(v.to_le_bytes());
    }
    fn kv_str(&mut self, k: &str, v: &str) {
        self.str(k);
        self.0.extend(8u32.to_le_bytes());
        self.str(v);
    }
    fn kv_str_array(&mut self, k: &str, items: &[&str]) {
        self.str(k);
        self.0.extend(9u32.to_le_bytes());
        self.0.extend(8u32.to_le_bytes());
        self.0.extend((items.len() as u64).to_le_bytes());
        for i in items {
            self.str(i);
        }
    }
}

impl GgufWriter {
    fn kv_i32_array(&mut self, k: &str, items: &[i32]) {
        self.str(k);
        self.0.extend(9u32.to_le_bytes());
        self.0.extend(5u32.to_le_bytes());
        self.0.extend((items.len() as u64).to_le_bytes());
        for i in items {
            self.0.extend(i.to_le_bytes());
        }
    }
}

/// A GGUF holding only a tokenizer: 3 tokens, one merge, and `types` as token_type.
fn tokenizer_gguf(types: &[i32]) -> Vec<u8> {
    let mut w = GgufWriter(b"GGUF".to_vec());
    w.0.extend(3u32.to_le_bytes());
    w.0.extend(0u64.to_le_bytes()); // tensors
    w.0.extend(4u64.to_le_bytes()); // kv
    w.kv_str_array("tokenizer.ggml.tokens", &["a", "b", "ab"]);
    w.kv_str_array("tokenizer.ggml.merges", &["a b"]);
    w.kv_str("tokenizer.ggml.model", "gpt2");
    w.kv_i32_array("tokenizer.ggml.token_type", types);
    w.0
}

#[test]
fn gguf_tokenizer_arrays_must_agree() {
    use flexquant::model::tokenizer::Tokenizer;
    let ok = Gguf::from_bytes("tok.gguf", tokenizer_gguf(&[1, 1, 1])).unwrap();
    Tokenizer::from_gguf(&ok).unwrap();
    for types in [&[1, 1, 1, 3, 3][..], &[1][..]] {
        let g = Gguf::from_bytes("tok.gguf", tokenizer_gguf(types)).unwrap();
        let e = Tokenizer::from_gguf(&g)
            .err()
            .expect("inconsistent arrays")
            .to_string();
        assert!(e.contains("tok.gguf") && e.contains("token_type"), "{e}");
    }
}

fn synthetic_gguf() -> Vec<u8> {
    let mut w = GgufWriter(b"GGUF".to_vec());
    w.0.extend(3u32.to_le_bytes());
    w.0.extend(2u64.to_le_bytes()); // tensors
    w.0.extend(5u64.to_le_bytes()); // kv
    w.kv_str("general.architecture", "llama");
    w.kv_u32("llama.block_count", 1);
    w.kv_u32("general.alignment", 32);
    w.kv_str_array("tokenizer.ggml.tokens", &["a", "b", "ab"]);
    w.kv_str("tokenizer.ggml.model", "gpt2");
    // tensor 0: f32 [64], tensor 1: Q8_0 [64 x 2]
    w.str("norm.weight");
    w.0.extend(1u32.to_le_bytes());
    w.0.extend(64u64.to_le_bytes());
    w.0.extend(0u32.to_le_bytes());
    w.0.extend(0u64.to_le_bytes());
    w.str("proj.weight");
    w.0.extend(2u32.to_le_bytes());
    w.0.extend(64u64.to_le_bytes());
    w.0.extend(2u64.to_le_bytes());
    w.0.extend(8u32.to_le_bytes());
    w.0.extend(256u64.to_le_bytes());
    while !w.0.len().is_multiple_of(32) {
        w.0.push(0);
    }
    w.0.extend(std::iter::repeat_n(0u8, 256 + 4 * 34));
    w.0
}

#[test]
fn gguf_parser_survives_thousands_of_corruptions() {
    let good = synthetic_gguf();
    let g = Gguf::from_bytes("synthetic.gguf", good.clone()).unwrap();
    assert_eq!(g.tensors.len(), 2);
    assert_eq!(g.dequantize(g.tensor("proj.weight").unwrap()).len(), 128);
    let mut rng = Rng::new(42);
    let mut rnd = |n: usize| (rng.next_f32() * n as f32) as usize % n.max(1);
    let (mut ok, mut err) = (0, 0);
    for i in 0..4000 {
        let mut b = good.clone();
        match i % 4 {
            0 => b.truncate(rnd(good.len())),
            1 => {
                for _ in 0..1 + rnd(4) {
                    let p = rnd(b.len());
                    b[p] = rnd(256) as u8;
                }
            }
            2 => {
                // A huge or odd count/length somewhere in the header.
                let p = rnd(good.len().min(300).saturating_sub(8));
                b[p..p + 8].copy_from_slice(&(u64::MAX >> rnd(64)).to_le_bytes());
            }
            _ => b = (0..rnd(400)).map(|_| rnd(256) as u8).collect(),
        }
        match Gguf::from_bytes("fuzz.gguf", b) {
            Ok(_) => ok += 1,
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("fuzz.gguf"),
                    "error does not name the file: {msg}"
                );
                err += 1;
            }
        }
    }
    eprintln!("gguf fuzz: {ok} parsed, {err} rejected, 0 panics");
    assert!(err > 2000);
}

#[test]
fn real_gguf_truncated_is_rejected_with_offset() {
    let Some(path) = common::demo_model_path() else {
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let mut rng = Rng::new(1);
    for cut in [0, 3, 4, 8, 23, 1000, 1_785_000, 40_000_000, bytes.len() - 1] {
        let e = load_gguf_bytes("cut.gguf", bytes[..cut].to_vec())
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("cut.gguf"), "{e}");
        assert!(
            e.contains("truncated")
                || e.contains("beyond the end")
                || e.contains("magic")
                || e.contains("impossible"),
            "{e}"
        );
    }
    // Random truncations of the metadata region.
    for _ in 0..40 {
        let cut = (rng.next_f32() * 1_785_000.0) as usize;
        assert!(Gguf::from_bytes("cut.gguf", bytes[..cut].to_vec()).is_err());
    }
}

fn corrupt(dir: &Path, file: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let p = dir.join(file);
    let mut b = std::fs::read(&p).unwrap();
    f(&mut b);
    std::fs::write(p, b).unwrap();
}

fn load_err(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("corrupt model in {} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupt_hf_directories_give_named_errors() {
    let fresh = || common::tiny_model_dir();
    let d = fresh();
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("config.json") && e.contains("No such file"),
        "{e}"
    );

    let d = fresh();
    corrupt(d.path(), "config.json", |b| b.truncate(b.len() / 2));
    assert!(load_err(d.path()).contains("config.json"));

    let d = fresh();
    corrupt(d.path(), "config.json", |b| {
        *b = String::from_utf8(b.clone())
            .unwrap()
            .replace("LlamaForCausalLM", "GPT2LMHeadModel")
            .into_bytes()
    });
    let e = load_err(d.path());
    assert!(e.contains("unknown architecture"), "{e}");

    let d = fresh();
    corrupt(d.path(), "config.json", |b| {
        *b = String::from_utf8(b.clone())
            .unwrap()
            .replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 3")
            .into_bytes()
    });
    let e = load_err(d.path());
    assert!(e.contains("not a multiple"), "{e}");

    let d = fresh();
    corrupt(d.path(), "tokenizer.json", |b| b.truncate(100));
    assert!(load_err(d.path()).contains("tokenizer.json"));

    for cut in [0usize, 7, 8, 50, 1000, 100_000] {
        let d = fresh();
        corrupt(d.path(), "model.safetensors", |b| b.truncate(cut));
        let e = load_err(d.path());
        assert!(e.contains("model.safetensors"), "cut {cut}: {e}");
    }
    // Header bytes flipped at random: rejected or (if the JSON still parses) shape-checked.
    let mut rng = Rng::new(3);
    for _ in 0..200 {
        let d = fresh();
        corrupt(d.path(), "model.safetensors", |b| {
            let p = 8 + (rng.next_f32() * 400.0) as usize;
            b[p] = b[p].wrapping_add(1 + (rng.next_f32() * 250.0) as u8);
        });
        let _ = load(d.path()); // must not panic
    }
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    use safetensors::tensor::TensorView;
    let d = common::tiny_model_dir();
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rewrite = |skip: &str,
                   reshape: Option<(&str, Vec<usize>)>,
                   dtype: Option<(&str, safetensors::Dtype)>| {
        let views: Vec<(String, TensorView)> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| n != skip)
            .map(|(n, t)| {
                let shape = match &reshape {
                    Some((rn, s)) if *rn == n => s.clone(),
                    _ => t.shape().to_vec(),
                };
                let dt = match &dtype {
                    Some((dn, d)) if *dn == n => *d,
                    _ => t.dtype(),
                };
                (n.clone(), TensorView::new(dt, shape, t.data()).unwrap())
            })
            .collect();
        std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
        load_err(d.path())
    };
    let e = rewrite("model.layers.1.mlp.down_proj.weight", None, None);
    assert!(
        e.contains("tensor model.layers.1.mlp.down_proj.weight missing"),
        "{e}"
    );
    let e = rewrite("", Some(("model.norm.weight", vec![8, 8])), None);
    assert!(
        e.contains("model.norm.weight has shape [8, 8], expected [64]"),
        "{e}"
    );
    let e = rewrite(
        "",
        None,
        Some(("model.norm.weight", safetensors::Dtype::I32)),
    );
    assert!(e.contains("model.norm.weight has dtype I32"), "{e}");
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flexquant"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn cli_rejects_bad_arguments_clearly() {
    let d = common::tiny_model_dir();
    let m = d.path().to_str().unwrap();
    let empty = d.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let text = d.path().join("text.txt");
    std::fs::write(&text, "some text ".repeat(50)).unwrap();
    let t = text.to_str().unwrap();

    let (ok, e) = cli(&["eval", "--model", "/nonexistent/model.gguf", "--text", t]);
    assert!(!ok && e.contains("/nonexistent/model.gguf"), "{e}");
    let (ok, e) = cli(&["eval", "--model", m, "--text", empty.to_str().unwrap()]);
    assert!(!ok && e.contains("empty.txt") && e.contains("empty"), "{e}");
    let (ok, e) = cli(&["eval", "--model", m, "--text", t, "--ctx", "1"]);
    assert!(!ok && e.contains("--ctx 1"), "{e}");
    let (ok, e) = cli(&[
        "eval", "--model", m, "--text", t, "--ctx", "64", "--stride", "65",
    ]);
    assert!(!ok && e.contains("--stride 65"), "{e}");
    let (ok, e) = cli(&["generate", "--model", m, "--prompt", ""]);
    assert!(!ok && e.contains("prompt is empty"), "{e}");
    let (ok, e) = cli(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "hi",
        "--kv-cache",
        "q4",
    ]);
    assert!(
        !ok && e.contains("--kv-cache") && e.contains("\"q4\"") && e.contains("int8"),
        "{e}"
    );
    let long = "word ".repeat(200);
    let (ok, e) = cli(&[
        "generate",
        "--model",
        m,
        "--prompt",
        &long,
        "--context",
        "64",
    ]);
    assert!(!ok && e.contains("the context holds 64"), "{e}");
    let (ok, e) = cli(&["generate", "--model", m, "--prompt", "hi", "--top-p", "0"]);
    assert!(!ok && e.contains("top_p"), "{e}");
    let (ok, e) = cli(&["eval", "--model", m]);
    assert!(!ok && e.contains("--text"), "{e}");
    let out = d.path().join("never-built");
    let (ok, e) = cli(&[
        "build",
        "--model",
        m,
        "--calib",
        t,
        "--heldout",
        t,
        "--search-tokens",
        "100",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && e.contains("--search-tokens") && e.contains("100"),
        "{e}"
    );
    assert!(!out.exists(), "a rejected build wrote {}", out.display());
    let (ok, e) = cli(&[
        "build",
        "--model",
        m,
        "--calib",
        t,
        "--heldout",
        t,
        "--n-up",
        "7",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && e.contains("7 bits") && e.contains("--n-up"), "{e}");
    assert!(!out.exists(), "a rejected build wrote {}", out.display());
    let (ok, _) = cli(&["eval", "--model", m, "--text", t, "--ctx", "64"]);
    assert!(ok);
    // Function calling: --tools needs --chat, names the file and the field it rejects.
    let tools = d.path().join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "a b"}}]"#,
    )
    .unwrap();
    let tools = tools.to_str().unwrap();
    let (ok, e) = cli(&["generate", "--model", m, "--prompt", "hi", "--tools", tools]);
    assert!(!ok && e.contains("--chat"), "{e}");
    let chat = ["generate", "--model", m, "--prompt", "hi", "--chat"];
    let (ok, e) = cli(&[&chat[..], &["--tools", tools]].concat());
    assert!(
        !ok && e.contains("tools.json") && e.contains("tools[0].function.name"),
        "{e}"
    );
    std::fs::write(
        tools,
        r#"[{"type": "function", "function": {"name": "f"}}]"#,
    )
    .unwrap();
    let (ok, e) = cli(&[&chat[..], &["--tools", tools, "--tool-choice", "g"]].concat());
    assert!(!ok && e.contains("`g` is not one of the tools"), "{e}");
    let (ok, e) = cli(&[&chat[..], &["--tools", tools, "--parallel-tool-calls", "2"]].concat());
    assert!(!ok && e.contains("--parallel-tool-calls"), "{e}");
}
