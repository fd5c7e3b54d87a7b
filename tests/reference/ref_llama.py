#!/usr/bin/env python3
"""Independent numpy reference for a Llama-architecture GGUF model (e.g. SmolLM2-135M).

Written top-to-bottom in the style of llama2.c's run.c. Dependencies: numpy, gguf, regex.
All model math is done in float64 (weights are dequantized from GGUF to float64).
RoPE follows llama.cpp's "normal" (non-NeoX) mode on the weights as stored in the GGUF:
adjacent pairs (2i, 2i+1) of each head are rotated by pos * base^(-2i/d); no un-permuting.
"""
import argparse
import json
import os
import sys
import time

# Single-threaded BLAS by default: far more predictable when cargo runs tests in parallel
# (multi-threaded OpenBLAS degrades badly on an oversubscribed machine). Override via env.
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np
import regex
import gguf

DT = np.float64

# ----------------------------------------------------------------------------- model loading

def load_gguf(path):
    r = gguf.GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:
            pass
    return r, meta

def load_weights(r, meta):
    arch = meta["general.architecture"]
    cfg = dict(
        n_layer=int(meta[f"{arch}.block_count"]), dim=int(meta[f"{arch}.embedding_length"]),
        n_head=int(meta[f"{arch}.attention.head_count"]), n_kv=int(meta[f"{arch}.attention.head_count_kv"]),
        rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]))
    cfg["head_dim"] = int(meta.get(f"{arch}.attention.key_length", cfg["dim"] // cfg["n_head"]))
    cfg["rope_dim"] = int(meta.get(f"{arch}.rope.dimension_count", cfg["head_dim"]))
    w = {}
    for t in r.tensors:
        # GGUF shape is [ne0, ne1] with ne0 the input (contiguous) dim -> numpy (ne1, ne0) = (out, in)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        w[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(DT)
    if "output.weight" not in w:           # tied embeddings
        w["output.weight"] = w["token_embd.weight"]
    cfg["vocab"] = w["token_embd.weight"].shape[0]
    return cfg, w

# ----------------------------------------------------------------------------- transformer

def rmsnorm(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g

def rope(x, pos, base, rope_dim):
    """x: (T, n_heads, head_dim); llama.cpp normal mode: rotate pairs (2i, 2i+1)."""
    i = np.arange(rope_dim // 2, dtype=DT)
    theta = pos[:, None].astype(DT) * base ** (-2.0 * i / rope_dim)          # (T, rope_dim/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x = x.copy()
    x0, x1 = x[..., 0:rope_dim:2].copy(), x[..., 1:rope_dim:2].copy()
    x[..., 0:rope_dim:2] = x0 * cos - x1 * sin
    x[..., 1:rope_dim:2] = x0 * sin + x1 * cos
    return x

def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)

def attention(q, k, v, pos_q, cfg):
    """q: (T, n_head, hd); k, v: (S, n_kv, hd) covering positions 0..S-1; causal."""
    group = cfg["n_head"] // cfg["n_kv"]
    k = np.repeat(k, group, axis=1)                      # query head h uses kv head h // group
    v = np.repeat(v, group, axis=1)
    mask = np.arange(k.shape[0])[None, :] > pos_q[:, None]                     # (T, S)
    q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)   # (heads, len, hd)
    scores = (q @ k.transpose(0, 2, 1)) / np.sqrt(cfg["head_dim"])                # (heads, T, S)
    scores = np.where(mask[None], -np.inf, scores)
    return (softmax(scores) @ v).transpose(1, 0, 2)                             # (T, heads, hd)

def swiglu_ffn(x, wg, wu, wd):
    g = x @ wg.T
    return ((g / (1.0 + np.exp(-g))) * (x @ wu.T)) @ wd.T

def forward(ids, cfg, w, cache, pos0=0):
    """Process ids at positions pos0.. (appending to the per-layer KV cache); returns logits (T, vocab)."""
    T, hd = len(ids), cfg["head_dim"]
    pos = np.arange(pos0, pos0 + T)
    x = w["token_embd.weight"][np.asarray(ids)]
    for l in range(cfg["n_layer"]):
        p = f"blk.{l}."
        h = rmsnorm(x, w[p + "attn_norm.weight"], cfg["eps"])
        q = (h @ w[p + "attn_q.weight"].T).reshape(T, cfg["n_head"], hd)
        k = (h @ w[p + "attn_k.weight"].T).reshape(T, cfg["n_kv"], hd)
        v = (h @ w[p + "attn_v.weight"].T).reshape(T, cfg["n_kv"], hd)
        q = rope(q, pos, cfg["rope_base"], cfg["rope_dim"])
        k = rope(k, pos, cfg["rope_base"], cfg["rope_dim"])
        if l in cache:
            k, v = np.concatenate([cache[l][0], k]), np.concatenate([cache[l][1], v])
        cache[l] = (k, v)
        o = attention(q, k, v, pos, cfg).reshape(T, cfg["n_head"] * hd)
        x = x + o @ w[p + "attn_output.weight"].T
        h = rmsnorm(x, w[p + "ffn_norm.weight"], cfg["eps"])
        x = x + swiglu_ffn(h, w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], w[p + "ffn_down.weight"])
    x = rmsnorm(x, w["output_norm.weight"], cfg["eps"])
    return x @ w["output.weight"].T

# ----------------------------------------------------------------------------- tokenizer (byte-level BPE)

GPT2_PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, map(chr, cs)))

class Tokenizer:
    def __init__(self, meta):
        self.tokens = list(meta["tokenizer.ggml.tokens"])
        self.types = list(meta["tokenizer.ggml.token_type"])
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(meta["tokenizer.ggml.merges"])}
        self.special = {t: i for i, t in enumerate(self.tokens) if self.types[i] == 3}
        alts = "|".join(regex.escape(s) for s in sorted(self.special, key=len, reverse=True))
        self.special_pat = regex.compile(f"({alts})")
        self.b2u = bytes_to_unicode()
        self.u2b = {u: b for b, u in self.b2u.items()}
        self.unk = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
        self.cache = {}

    def bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: self.ranks.get((parts[i], parts[i + 1]), 1 << 60))
            rank = self.ranks.get((parts[best], parts[best + 1]))
            if rank is None:
                break
            a, b = parts[best], parts[best + 1]
            out, i = [], 0
            while i < len(parts):          # merge all non-overlapping occurrences, left to right
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b); i += 2
                else:
                    out.append(parts[i]); i += 1
            parts = out
        return [self.vocab.get(p, self.unk) for p in parts]

    def encode(self, text):
        ids = []
        for seg in self.special_pat.split(text) if self.special else [text]:
            if seg in self.special:
                ids.append(self.special[seg]); continue
            # smollm pre-tokenizer: Digits(individual_digits=True), then GPT-2 ByteLevel regex
            for piece in regex.split(r"(\p{N})", seg):
                for word in GPT2_PAT.findall(piece):
                    if word not in self.cache:
                        self.cache[word] = self.bpe("".join(self.b2u[b] for b in word.encode("utf-8")))
                    ids.extend(self.cache[word])
        return ids

    def decode(self, ids):
        out = bytearray()
        for i in ids:
            tok = self.tokens[i]
            if self.types[i] == 3:
                out += tok.encode("utf-8")
            else:
                out += bytes(self.u2b[c] for c in tok)
        return out.decode("utf-8", errors="replace")

# ----------------------------------------------------------------------------- CLI

def nll_rows(logits, targets):
    m = logits.max(axis=-1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))
    return -logp[np.arange(len(targets)), targets]

def greedy(ids, n, cfg, w):
    cache, new = {}, []
    logits = forward(ids, cfg, w, cache)[-1]
    for step in range(n):
        nxt = int(np.argmax(logits))          # argmax returns the lowest index on ties
        new.append(nxt)
        if step + 1 < n:
            logits = forward([nxt], cfg, w, cache, pos0=len(ids) + step)[-1]
    return new

def run_all(a, tok, cfg, w):
    """--out is a directory: ids.json (whole text), logits.f32 (first --logit-rows rows of the
    forward over the first --ppl-tokens ids), ppl.json (that window), greedy.json."""
    os.makedirs(a.out, exist_ok=True)
    with open(a.text, encoding="utf-8", newline="") as f:
        ids = tok.encode(f.read())
    with open(os.path.join(a.out, "ids.json"), "w") as f:
        json.dump(ids, f)
    win = ids[:a.ppl_tokens]
    logits = forward(win, cfg, w, {})
    logits[:a.logit_rows].astype("<f4").tofile(os.path.join(a.out, "logits.f32"))
    nll = nll_rows(logits[:-1], win[1:])
    with open(os.path.join(a.out, "ppl.json"), "w") as f:
        json.dump({"ppl": float(np.exp(nll.mean())), "nll_sum": float(nll.sum()), "count": len(win) - 1}, f)
    with open(os.path.join(a.out, "greedy.json"), "w") as f:
        json.dump(greedy(ids[:a.greedy_prompt], a.greedy_n, cfg, w), f)

def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, args in [("tokenize", ["--text"]), ("detokenize", ["--ids"]), ("forward", ["--ids"]),
                       ("greedy", ["--ids", "--n"]), ("ppl", ["--ids"]), ("all", ["--text"])]:
        sp = sub.add_parser(name)
        sp.add_argument("--gguf", required=True)
        sp.add_argument("--out", required=True)
        for a in args:
            sp.add_argument(a, required=True, type=int if a == "--n" else str)
        if name == "all":  # one model load for every check the Rust test makes
            for opt, d in [("--ppl-tokens", 512), ("--logit-rows", 96), ("--greedy-prompt", 64), ("--greedy-n", 32)]:
                sp.add_argument(opt, type=int, default=d)
    a = ap.parse_args()
    t0 = time.time()
    reader, meta = load_gguf(a.gguf)

    if a.cmd in ("tokenize", "detokenize"):
        tok = Tokenizer(meta)
        if a.cmd == "tokenize":
            with open(a.text, encoding="utf-8", newline="") as f:
                ids = tok.encode(f.read())
            with open(a.out, "w") as f:
                json.dump(ids, f)
        else:
            with open(a.ids) as f:
                ids = json.load(f)
            with open(a.out, "w", encoding="utf-8", newline="") as f:
                f.write(tok.decode(ids))
        print(f"{a.cmd}: {len(ids)} ids in {time.time() - t0:.2f}s", file=sys.stderr)
        return

    cfg, w = load_weights(reader, meta)
    if a.cmd == "all":
        run_all(a, Tokenizer(meta), cfg, w)
        print(f"all: done in {time.time() - t0:.2f}s", file=sys.stderr)
        return
    with open(a.ids) as f:
        ids = [int(i) for i in json.load(f)]
    t1 = time.time()
    if a.cmd == "forward":
        forward(ids, cfg, w, {}).astype("<f4").tofile(a.out)
    elif a.cmd == "greedy":
        with open(a.out, "w") as f:
            json.dump(greedy(ids, a.n, cfg, w), f)
    elif a.cmd == "ppl":
        nll = nll_rows(forward(ids, cfg, w, {})[:-1], ids[1:])
        res = {"ppl": float(np.exp(nll.mean())), "nll_sum": float(nll.sum()), "count": len(ids) - 1}
        with open(a.out, "w") as f:
            json.dump(res, f)
    print(f"{a.cmd}: T={len(ids)} load {t1 - t0:.2f}s compute {time.time() - t1:.2f}s", file=sys.stderr)

if __name__ == "__main__":
    main()
