//! Chat-shaped text without outside data: conversations whose prompts are drawn from the
//! corpora and whose answers the float model samples itself (the data-free approach of
//! LLM-QAT), rendered with the model's own chat template. What a chat page sends is this
//! shape (template tokens, a question about a passage, the model's kind of answer), not
//! novels; as a calibration source it shows the quantizers those activations.
//!
//! Reproducible: the same model, prompt texts and settings give the same bytes (sampling from
//! `seed`, the reference forward in f32, prompts picked by the same generator). Calibration
//! and held-out sets are made from disjoint texts (the corpora's calibration and held-out
//! splits), so they never share a prompt's passage.

use crate::error::{Error, Result};
use crate::model::chat::Message;
use crate::model::forward::{forward_last, KvCache};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::Weights;
use crate::runtime::generate::{sample, top_k, Rng, Sampling, TOP_K};

/// How many conversations, how long their answers, from which seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChatSettings {
    pub conversations: usize,
    pub max_answer_tokens: usize,
    pub seed: u64,
}

/// The questions a prompt asks about its passage, in turn.
const ASKS: [&str; 5] = [
    "Summarize this passage in two sentences.",
    "What might happen next? Answer briefly.",
    "Explain in simple words what this passage says.",
    "Who is speaking or acting here, and how do they feel?",
    "Write a short reply to this, as a friend would.",
];

/// Passages of 200 to 700 bytes: paragraphs of the texts (blank-line separated).
fn passages(texts: &[&str]) -> Vec<String> {
    texts
        .iter()
        .flat_map(|t| t.split("\n\n"))
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| (200..=700).contains(&p.len()))
        .collect()
}

/// `n` user prompts: passages of `texts` picked by `seed`, each with a question (`ASKS`).
pub fn prompts(texts: &[&str], n: usize, seed: u64) -> Result<Vec<String>> {
    let all = passages(texts);
    if all.len() < n {
        return Err(Error::input(format!(
            "chat prompts: {n} wanted, the texts have {} passages of 200-700 bytes",
            all.len()
        )));
    }
    let mut rng = Rng::new(seed ^ 0x5eed_c4a7);
    let mut taken = vec![false; all.len()];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let i = ((rng.next_f32() as f64 * all.len() as f64) as usize).min(all.len() - 1);
        if std::mem::replace(&mut taken[i], true) {
            continue;
        }
        out.push(format!("{}\n\n{}", ASKS[out.len() % ASKS.len()], all[i]));
    }
    Ok(out)
}

/// The conversations as text: each prompt rendered with the model's chat template, then the
/// answer the float model samples (chat sampling, top-40, at most `max_answer_tokens`) and its
/// end token; conversations separated by a blank line. `progress(done, total)` per answer.
pub fn generate(
    w: &Weights,
    tok: &Tokenizer,
    prompts: &[String],
    s: ChatSettings,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<String> {
    let sampling = Sampling {
        seed: s.seed,
        ..Sampling::chat()
    };
    let mut rng = Rng::new(s.seed);
    let mut out = String::new();
    for (n, p) in prompts.iter().enumerate() {
        let rendered = tok.chat.render(&[Message::new("user", p)])?;
        let ids = tok.encode(&rendered)?;
        let mut cache = KvCache::new(w, ids.len() + s.max_answer_tokens + 1);
        let mut logits = forward_last(w, &ids, &mut cache)?;
        let mut answer = Vec::new();
        loop {
            let id = sample(
                &top_k(&logits, TOP_K),
                &sampling,
                &mut rng,
                ids.len() + answer.len(),
            )?;
            answer.push(id);
            if tok.stop.contains(&id) || answer.len() >= s.max_answer_tokens {
                break;
            }
            logits = forward_last(w, &[id], &mut cache)?;
        }
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(&rendered);
        out.push_str(&tok.decode(&answer, false)?);
        progress(n + 1, prompts.len());
    }
    out.push('\n');
    Ok(out)
}
