//! Seed inputs from real files: a built ensemble (manifest, shards, base, tokenizer), the demo
//! GGUF (its real metadata and a few real tensors, shrunk so that one input stays small), the
//! tiny Hugging Face model (config + safetensors, also rewritten as a complete GGUF) and real
//! chat requests. Mutations of real files reach far deeper than random bytes.

use crate::ensemble::manifest::Manifest;
use crate::error::{read_capped, Error, Result};
use crate::fuzz::targets::frame;
use crate::model::gguf::{GgmlType, Gguf, Value};
use crate::model::load::load_hf_dir;
use crate::model::tiny::SPECIALS;
use crate::model::tokenizer::bytes_to_unicode;
use crate::model::weights::ModuleKind;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the real files are.
pub struct SeedFiles {
    /// A built ensemble directory (manifest.json, base.bin, modules/, tokenizer.json).
    pub ensemble: PathBuf,
    /// The demo GGUF.
    pub gguf: PathBuf,
    /// The tiny Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    pub tiny_model: PathBuf,
    /// A directory of chat request JSON files.
    pub requests: PathBuf,
}

/// Tokens of the demo vocabulary kept in its shrunk GGUF seed (the specials and the bytes
/// come first in SmolLM2's vocabulary).
const KEEP_TOKENS: usize = 600;
/// Module shards used as seeds (of every bit-width the ensemble has, the smallest first).
const SHARD_SEEDS: usize = 8;

fn read(p: &Path) -> Result<Vec<u8>> {
    read_capped(p, 256 << 20)
}

/// The seeds of every target, by target name.
pub fn load(f: &SeedFiles) -> Result<BTreeMap<&'static str, Vec<Vec<u8>>>> {
    let mut s: BTreeMap<&'static str, Vec<Vec<u8>>> = BTreeMap::new();
    let man_bytes = read(&f.ensemble.join("manifest.json"))?;
    let man = Manifest::from_bytes("manifest.json", &man_bytes)?;
    let compact = serde_json::to_vec(&man).map_err(|e| Error::format("manifest.json", e))?;
    s.insert("manifest", vec![man_bytes, compact]);

    let g = man.quantizer.group_size;
    let mut versions: Vec<_> = man.modules.iter().collect();
    versions.sort_by_key(|v| (v.file.bytes, v.bits));
    versions.dedup_by_key(|v| v.bits);
    let mut shards = Vec::new();
    for v in versions.iter().take(SHARD_SEEDS) {
        let (r, c) = v.kind.shape(&man.config);
        let head: Vec<u8> = [r as u32, c as u32, v.bits, g as u32]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut b = head;
        b.extend(crate::ensemble::files::read_verified(&f.ensemble, &v.file)?);
        shards.push(b);
    }
    s.insert("shard", shards);
    // Bit-plane files: each shard seed's codes nested down to 2 bits (its scales reused).
    let mut planes = Vec::new();
    for v in versions.iter().take(SHARD_SEEDS) {
        let top = v.matrix(
            &man.config,
            g,
            &crate::ensemble::files::read_verified(&f.ensemble, &v.file)?,
        )?;
        planes.push(planes_seed(&top)?);
    }
    s.insert("planes", planes);
    let config = serde_json::to_vec(&man.config).map_err(|e| Error::format("config", e))?;
    let base = crate::ensemble::files::read_verified(&f.ensemble, &man.base)?;
    s.insert(
        "base",
        vec![frame(&[&(g as u32).to_le_bytes(), &config, &base])],
    );

    let demo_bytes = read_capped(&f.gguf, 1 << 30)?;
    // The header and the start of the metadata, cut anywhere: truncation at every offset.
    let demo_head = demo_bytes[..demo_bytes.len().min(64 << 10)].to_vec();
    let demo = Gguf::from_bytes(&f.gguf.display().to_string(), demo_bytes)?;
    let demo_small = shrink_demo(&demo)?;
    let demo_tok = crate::model::tokenizer::Tokenizer::from_gguf(&Gguf::from_bytes(
        "demo (shrunk)",
        demo_small.clone(),
    )?)?;
    s.insert(
        "gguf",
        vec![demo_small, tiny_gguf(&f.tiny_model)?, demo_head],
    );

    s.insert(
        "tokenizer",
        vec![
            crate::ensemble::files::read_verified(&f.ensemble, &man.tokenizer)?,
            demo_tok.to_json()?.into_bytes(),
        ],
    );
    let tiny_config = read(&f.tiny_model.join("config.json"))?;
    let tiny_st = read(&f.tiny_model.join("model.safetensors"))?;
    s.insert("safetensors", vec![frame(&[&tiny_config, &tiny_st])]);

    let mut requests = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&f.requests)
        .map_err(|e| Error::io(&f.requests, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    for p in paths {
        requests.push(read(&p)?);
    }
    if requests.is_empty() {
        return Err(Error::format(f.requests.display(), "no *.json requests"));
    }
    // JSON mode's automaton starts from real JSON objects: the requests.
    s.insert("json_mode", requests.clone());
    // Tool calls start from whole calls to each of `targets::fuzz_tools`.
    s.insert(
        "tool_call",
        vec![
            br#"{"name": "w", "arguments": {"u": "c", "d": -12}}"#.to_vec(),
            br#"{"name":"t","arguments":{"z":[true,false],"s":"\u00e9x"}}"#.to_vec(),
            br#"{"name": "w", "arguments": {"u": "f", "d": null}}"#.to_vec(),
        ],
    );
    // Parallel calls start from answers of two or three calls.
    s.insert(
        "tool_calls",
        vec![
            br#"{"name": "w", "arguments": {"u": "c"}}
{"name":"t","arguments":{}}"#
                .to_vec(),
            br#" <tool_call>{"name": "t", "arguments": {"z": []}}</tool_call>
<tool_call>
{"name": "w", "arguments": {"u": "f", "d": 3}} {"name":"w","arguments":{"u":"c"}}"#
                .to_vec(),
        ],
    );
    // Structured output starts from whole texts of `targets::fuzz_structured_schema`.
    s.insert(
        "structured",
        vec![
            br#"{"n": -30, "x": 0.75, "p": "AB-1", "d": "2024-02-28", "e": [1,{"k":"v"}], "s": "ab"}"#
                .to_vec(),
            br#"{"s":"\u00e9b\n","e":null,"d":"1999-12-31","p":"CC-999","x":null,"n":996,"u":{"q":null,"k":-4},"c":["xy","x"]}"#
                .to_vec(),
            r#"{"x": -2.4999, "n": 0, "e": 2.5, "p": "AA-0", "d": "2000-01-01", "s": "éb", "u": {"k": 1, "m": true}}"#
                .as_bytes()
                .to_vec(),
        ],
    );
    s.insert("request", requests);
    Ok(s)
}

/// A framed bit-plane file (`targets::planes`) of `top` and every narrower level of the packed
/// format down to 2 bits, each the top bits of `top`'s codes, on grids derived from `top`'s.
fn planes_seed(top: &crate::ensemble::format::PackedMatrix) -> Result<Vec<u8>> {
    use crate::ensemble::format::{unpack_scale_zero, PackedMatrix, PackedShape, BITS};
    use crate::ensemble::planes::{delta_bytes, level_params, widen};
    let s = top.shape;
    let params: Vec<(f32, f32)> = top.scales.iter().map(|&w| unpack_scale_zero(w)).collect();
    let codes: Vec<u32> = (0..s.rows)
        .flat_map(|r| (0..s.cols).map(move |c| (r, c)))
        .map(|(r, c)| top.code(r, c))
        .collect();
    let mut levels = vec![top.clone()];
    for &b in BITS.iter().filter(|&&b| b < s.bits && b >= 2) {
        let shift = s.bits - b;
        let shifted: Vec<u8> = codes.iter().map(|&c| (c >> shift) as u8).collect();
        let shape = PackedShape::new(s.rows, s.cols, b, s.group)?;
        // The coarsened grid, and some groups moved (deltas the file stores in one or two bytes).
        let lower: Vec<(f32, f32)> = params
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let d = if delta_bytes(shift) == 1 {
                    widen((i as u32 * 2654 % 251) as u8)
                } else {
                    (i as u16 * 2654) & 0x3f3f
                };
                level_params(p, shift, d)
            })
            .collect();
        levels.push(PackedMatrix::from_codes(shape, &shifted, &lower));
    }
    let refs: Vec<&PackedMatrix> = levels.iter().collect();
    let (shape, body) = crate::ensemble::planes::encode(&refs, "seed")?;
    let mut b: Vec<u8> = [shape.rows, shape.cols, shape.group, shape.levels.len()]
        .iter()
        .flat_map(|&x| (x as u32).to_le_bytes())
        .collect();
    b.extend(shape.levels.iter().flat_map(|l| l.to_le_bytes()));
    b.extend(body);
    Ok(b)
}

/// GGUF v3 bytes of `meta` and `tensors` (name, ggml dims, ggml type id, data).
pub fn write_gguf(
    meta: &[(String, Value)],
    tensors: &[(String, Vec<usize>, u32, Vec<u8>)],
) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        b.extend(type_id(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        put_str(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    for (_, _, _, data) in tensors {
        b.extend(data);
        b.resize(b.len().div_ceil(32) * 32, 0);
    }
    b
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A value without its type tag (arrays carry their item type).
fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.extend(x.to_le_bytes()),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::Str(s) => put_str(b, s),
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
        Value::Array(a) => {
            b.extend(a.first().map_or(8, type_id).to_le_bytes());
            b.extend((a.len() as u64).to_le_bytes());
            for x in a {
                if let Value::Array(_) = x {
                    b.extend(9u32.to_le_bytes());
                }
                put_value(b, x);
            }
        }
    }
}

/// The demo GGUF's real metadata with its vocabulary cut to `KEEP_TOKENS` (token types and
/// merges cut to match), and a few real tensors cut to a few rows: one F32, one Q4_1, one Q8_0.
fn shrink_demo(g: &Gguf) -> Result<Vec<u8>> {
    let tokens: Vec<&str> = g
        .meta("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .ok_or_else(|| Error::format(&g.name, "no tokenizer.ggml.tokens"))?
        .iter()
        .take(KEEP_TOKENS)
        .filter_map(|v| v.as_str())
        .collect();
    let kept: std::collections::HashSet<&str> = tokens.iter().copied().collect();
    let mut meta = Vec::new();
    for (k, v) in &g.metadata {
        let v = match (k.as_str(), v) {
            ("tokenizer.ggml.tokens" | "tokenizer.ggml.token_type", Value::Array(a)) => {
                Value::Array(a[..KEEP_TOKENS.min(a.len())].to_vec())
            }
            ("tokenizer.ggml.merges", Value::Array(a)) => Value::Array(
                a.iter()
                    .filter(|m| {
                        m.as_str().is_some_and(|m| {
                            let mut p = m.split(' ');
                            let (a, b) = (p.next().unwrap_or(""), p.next().unwrap_or(""));
                            kept.contains(a)
                                && kept.contains(b)
                                && kept.contains(&*(a.to_string() + b))
                        })
                    })
                    .cloned()
                    .collect(),
            ),
            _ => v.clone(),
        };
        meta.push((k.clone(), v));
    }
    let mut tensors = Vec::new();
    for (name, rows) in [
        ("output_norm.weight", 1),
        ("blk.0.attn_k.weight", 32),
        ("token_embd.weight", 16),
    ] {
        let t = g
            .tensor(name)
            .ok_or_else(|| Error::format(&g.name, format!("no tensor {name}")))?;
        let raw = g.raw(t);
        let (dims, len) = if t.dims.len() == 1 {
            (t.dims.clone(), raw.len())
        } else {
            (vec![t.dims[0], rows], raw.len() / t.dims[1] * rows)
        };
        let id = match t.dtype {
            GgmlType::F32 => 0,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            other => return Err(Error::format(&g.name, format!("{name} is {other:?}"))),
        };
        tensors.push((name.to_string(), dims, id, raw[..len].to_vec()));
    }
    Ok(write_gguf(&meta, &tensors))
}

/// Q8_0 blocks of `w` (a multiple of 32 values): f16 scale, then 32 signed bytes.
fn q8_0(w: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(w.len() / 32 * 34);
    for blk in w.chunks_exact(32) {
        let amax = blk.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        out.extend(half::f16::from_f32(d).to_le_bytes());
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend(blk.iter().map(|x| (x * inv).round() as i8 as u8));
    }
    out
}

/// The tiny model as a complete GGUF that loads: llama metadata, its byte-level vocabulary,
/// Q8_0 matrices and F32 norms.
fn tiny_gguf(dir: &Path) -> Result<Vec<u8>> {
    let m = load_hf_dir(dir)?;
    let w = &m.weights;
    let c = &w.config;
    let u = |v: usize| Value::U32(v as u32);
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(bytes_to_unicode().into_iter().map(String::from));
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < SPECIALS.len() { 3 } else { 1 }))
        .collect();
    let s = |x: &str| Value::Str(x.into());
    let meta: Vec<(String, Value)> = [
        ("general.architecture", s("llama")),
        ("llama.block_count", u(c.num_hidden_layers)),
        ("llama.context_length", u(c.max_position_embeddings)),
        ("llama.embedding_length", u(c.hidden_size)),
        ("llama.feed_forward_length", u(c.intermediate_size)),
        ("llama.attention.head_count", u(c.num_attention_heads)),
        ("llama.attention.head_count_kv", u(c.n_kv_heads())),
        ("llama.rope.freq_base", Value::F32(c.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(c.rms_norm_eps),
        ),
        ("llama.vocab_size", u(c.vocab_size)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
        (
            "tokenizer.chat_template",
            s("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let h = c.hidden_size;
    let mut t = vec![(
        "token_embd.weight".to_string(),
        vec![h, c.vocab_size],
        8,
        q8_0(&w.embed),
    )];
    for l in 0..c.num_hidden_layers {
        let n = &w.norms[l];
        t.push((
            format!("blk.{l}.attn_norm.weight"),
            vec![h],
            0,
            f32s(&n.attn_norm),
        ));
        t.push((
            format!("blk.{l}.ffn_norm.weight"),
            vec![h],
            0,
            f32s(&n.ffn_norm),
        ));
        for kind in ModuleKind::ALL {
            let lin = &w.modules[l * 7 + kind as usize];
            t.push((
                format!("blk.{l}.{}.weight", kind.gguf_name()),
                vec![lin.cols, lin.rows],
                8,
                q8_0(&lin.w),
            ));
        }
    }
    t.push(("output_norm.weight".into(), vec![h], 0, f32s(&w.final_norm)));
    if let Some(head) = &w.lm_head {
        t.push((
            "output.weight".into(),
            vec![head.cols, head.rows],
            8,
            q8_0(&head.w),
        ));
    }
    Ok(write_gguf(&meta, &t))
}
