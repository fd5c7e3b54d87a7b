//! The demo model end to end: tokenizer round trip on the whole held-out novel, a chat answer,
//! and the CLI's JSON outputs.

use crate::common;

use flexquant::model::chat::Message;
use flexquant::model::load::load;
use flexquant::model::tokenizer::StreamDecoder;
use flexquant::runtime::reference::Reference;
use flexquant::runtime::{Sampling, Session, StopReason};
use pollster::block_on;
use std::process::Command;

#[test]
fn demo_model_tokenizes_chats_and_evaluates() {
    let (Some(path), Some(heldout)) = (common::demo_model_path(), common::heldout_text()) else {
        return;
    };
    let m = load(&path).unwrap();
    let c = &m.weights.config;
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size),
        (30, 576, 1536)
    );
    assert_eq!(
        (c.num_attention_heads, c.n_kv_heads(), c.head_dim()),
        (9, 3, 64)
    );
    assert_eq!(
        (c.vocab_size, c.rope_theta, c.tie_word_embeddings),
        (49152, 100000.0, true)
    );
    assert_eq!(m.tokenizer.bos, Some(1));
    assert!(m.tokenizer.stop.contains(&2));

    // The whole held-out novel round-trips exactly; digits are split one by one.
    let ids = m.tokenizer.encode(&heldout).unwrap();
    assert!(ids.len() > 150_000, "{} tokens", ids.len());
    assert_eq!(m.tokenizer.decode(&ids, false).unwrap(), heldout);
    let digits = m.tokenizer.encode("1234").unwrap();
    assert_eq!(digits.len(), 4);

    // A factual chat answer, greedy, through the session (prefix reuse on the second turn).
    let mut s = Session::new(Reference::new(m.weights.clone(), 512));
    let mut msgs = vec![Message::new("user", "What is the capital of France?")];
    let prompt = m
        .tokenizer
        .encode(&m.tokenizer.chat.render(&msgs).unwrap())
        .unwrap();
    let mut streamed = String::new();
    let params = Sampling {
        max_tokens: 40,
        ..Default::default()
    };
    let mut dec = StreamDecoder::default();
    let stop = m.tokenizer.stop.clone();
    let (out, stats) = block_on(s.generate(&prompt, &params, &stop, |id| {
        streamed.push_str(&dec.step(&m.tokenizer, id).unwrap());
        true
    }))
    .unwrap();
    let answer = m.tokenizer.decode(&out, true).unwrap();
    eprintln!("answer: {answer:?} {stats:?}");
    assert_eq!(streamed, answer);
    assert!(answer.contains("Paris"), "{answer}");
    assert_eq!(stats.stopped_by, Some(StopReason::Eos));
    msgs.push(Message::new("assistant", &answer));
    msgs.push(Message::new("user", "And of Italy?"));
    let prompt2 = m
        .tokenizer
        .encode(&m.tokenizer.chat.render(&msgs).unwrap())
        .unwrap();
    let (out2, stats2) = block_on(s.generate(&prompt2, &params, &stop, |_| true)).unwrap();
    assert!(
        stats2.prefilled < prompt2.len() / 2,
        "the first turn should come from the cache: {stats2:?}"
    );
    let answer2 = m.tokenizer.decode(&out2, true).unwrap();
    eprintln!("answer 2: {answer2:?}");
    assert!(answer2.contains("Rome"), "{answer2}");
}

#[test]
fn cli_info_and_eval_json() {
    let (Some(path), Some(_)) = (common::demo_model_path(), common::heldout_text()) else {
        return;
    };
    let text = common::cache_dir().join("text/austen-heldout.txt");
    let bin = env!("CARGO_BIN_EXE_flexquant");
    let out = Command::new(bin)
        .arg("info")
        .arg(&path)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["parameters"], 134_515_008);
    assert_eq!(j["modules_total"], 210);
    let out = Command::new(bin)
        .args([
            "eval",
            "--json",
            "--ctx",
            "256",
            "--max-tokens",
            "1024",
            "--model",
        ])
        .arg(&path)
        .arg("--text")
        .arg(&text)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ppl = j["ppl"].as_f64().unwrap();
    assert_eq!(j["tokens"], 1024);
    assert_eq!(j["count"], 1020); // 4 windows of 256, the first token of each unscored
    assert!(j["seconds"].as_f64().unwrap() > 0.0);
    // A 135M model on Austen's prose: far better than uniform (49152) and than a unigram model.
    assert!(ppl > 5.0 && ppl < 40.0, "ppl {ppl}");
}

/// The incremental stream decoder gives exactly the full decode, piece by piece, on real text
/// with multi-byte characters split across tokens.
#[test]
fn stream_decoding_equals_the_full_decode() {
    let Some((m, ids)) = crate::common::demo() else {
        return;
    };
    let tok = &m.tokenizer;
    let mut all = ids[..3000].to_vec();
    all.extend(tok.encode("naïve café — 日本語の文章 🎉🎉 «done»").unwrap());
    let mut dec = StreamDecoder::default();
    let mut streamed = String::new();
    for &id in &all {
        streamed.push_str(&dec.step(tok, id).unwrap());
    }
    assert_eq!(streamed, tok.decode(&all, true).unwrap());
}
