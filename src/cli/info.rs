use anyhow::Result;
use flexquant::model::ModuleKind;
use std::path::Path;

pub fn run(model: &Path, json: bool) -> Result<()> {
    let m = super::load_model(model)?;
    let c = &m.weights.config;
    let modules: Vec<_> = ModuleKind::ALL
        .iter()
        .map(|k| {
            let (r, cols) = k.shape(c);
            serde_json::json!({"kind": k.name(), "rows": r, "cols": cols, "params": r * cols,
                               "f32_bytes": r * cols * 4, "f16_bytes": r * cols * 2})
        })
        .collect();
    let report = serde_json::json!({
        "source": m.source,
        "config": c,
        "parameters": c.param_count(),
        "modules_per_layer": modules,
        "modules_total": c.num_hidden_layers * 7,
        "vocab": m.tokenizer.vocab_size(),
        "stop_tokens": m.tokenizer.stop,
        "chat_template": format!("{:?}", m.tokenizer.chat),
        "chat_template_warning": m.tokenizer.chat.fallback_warning(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model       {}", m.source);
    println!(
        "shape       {} layers, hidden {}, ffn {}, {} heads / {} kv heads of {}, vocab {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.n_kv_heads(),
        c.head_dim(),
        c.vocab_size
    );
    println!(
        "rope theta  {}, rms eps {}, context {}, tied embeddings {}",
        c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings
    );
    println!(
        "parameters  {} ({:.1} M)",
        c.param_count(),
        c.param_count() as f64 / 1e6
    );
    println!("modules     {} (7 per layer):", c.num_hidden_layers * 7);
    for k in ModuleKind::ALL {
        let (r, cols) = k.shape(c);
        println!(
            "  {:<5} {:>5} x {:<5} {:>9} params  {:>8} bytes f16",
            k.name(),
            r,
            cols,
            r * cols,
            r * cols * 2
        );
    }
    Ok(())
}
