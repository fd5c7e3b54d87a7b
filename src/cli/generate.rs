use super::SamplingArgs;
use anyhow::Result;
use clap::Args;
use flexquant::model::chat::Message;
use flexquant::model::generate::{GenStats, Session};
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print a JSON line with the generated ids and timing at the end.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    gpu: super::gpu::GpuArgs,
}

#[derive(Args)]
pub struct ChatArgs {
    #[arg(long)]
    model: PathBuf,
    /// System prompt (default: the model's own).
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    gpu: super::gpu::GpuArgs,
}

fn print_piece(piece: &str) -> bool {
    print!("{piece}");
    let _ = std::io::stdout().flush();
    true
}

fn speed(s: &GenStats) -> String {
    format!(
        "[{} prompt tokens ({} run) in {:.2} s, {} tokens at {:.1} tok/s, stopped by {}]",
        s.prompt_tokens,
        s.prefilled,
        s.prefill_seconds,
        s.generated,
        s.generated as f64 / s.decode_seconds.max(1e-9),
        s.stopped_by
    )
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let m = super::load_model(&a.model)?;
    if a.prompt.trim().is_empty() {
        anyhow::bail!("--prompt is empty");
    }
    let text = if a.chat {
        m.tokenizer.chat.render(&[Message::new("user", &a.prompt)])
    } else {
        a.prompt.clone()
    };
    let ids = m.tokenizer.encode(&text)?;
    if a.gpu.gpu {
        return generate_gpu(&a, &m, &ids);
    }
    let mut session = Session::new(&m.weights, &m.tokenizer, a.sampling.context);
    let (out, stats) = session.generate(&ids, &a.sampling.params(), print_piece)?;
    println!();
    eprintln!("{}", speed(&stats));
    if a.json {
        println!("{}", serde_json::json!({"ids": out, "stats": stats}));
    }
    Ok(())
}

/// The same generation on the GPU engine, streaming each token's text as it comes.
fn generate_gpu(
    a: &GenerateArgs,
    m: &flexquant::model::load::LoadedModel,
    ids: &[u32],
) -> Result<()> {
    use flexquant::gpu::session::Session;
    let opts = flexquant::gpu::ModelOptions {
        context: a
            .sampling
            .context
            .min(m.weights.config.max_position_embeddings),
        ..Default::default()
    };
    let mut session = Session::new(a.gpu.model(m, opts)?);
    let (out, stats) = gpu_turn(&mut session, m, ids, &a.sampling)?;
    println!();
    eprintln!("{}", speed(&stats));
    if a.json {
        println!("{}", serde_json::json!({"ids": out, "stats": stats}));
    }
    Ok(())
}

/// One streamed generation on the GPU engine.
fn gpu_turn(
    session: &mut flexquant::gpu::session::Session,
    m: &flexquant::model::load::LoadedModel,
    ids: &[u32],
    sampling: &SamplingArgs,
) -> Result<(Vec<u32>, GenStats)> {
    let s = flexquant::gpu::session::Sampling {
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        max_tokens: sampling.max_tokens,
        seed: sampling.seed,
    };
    let mut dec = flexquant::model::tokenizer::StreamDecoder::default();
    let (out, st) = pollster::block_on(session.generate(ids, &s, &m.tokenizer.stop, |id| {
        dec.step(&m.tokenizer, id).map_or(true, |p| print_piece(&p))
    }))?;
    let stats = GenStats {
        prompt_tokens: st.prompt_tokens,
        prefilled: st.prefilled,
        generated: st.generated,
        prefill_seconds: st.prefill_seconds,
        decode_seconds: st.decode_seconds,
        stopped_by: st.stopped_by,
    };
    Ok((out, stats))
}

pub fn run_chat(a: ChatArgs) -> Result<()> {
    let m = super::load_model(&a.model)?;
    let mut session = Session::new(&m.weights, &m.tokenizer, a.sampling.context);
    let mut gpu_session = if a.gpu.gpu {
        let opts = flexquant::gpu::ModelOptions {
            context: a
                .sampling
                .context
                .min(m.weights.config.max_position_embeddings),
            ..Default::default()
        };
        Some(flexquant::gpu::session::Session::new(
            a.gpu.model(&m, opts)?,
        ))
    } else {
        None
    };
    let mut messages: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    println!("chatting with {} (empty line or Ctrl-D to quit)", m.source);
    let stdin = std::io::stdin();
    loop {
        print!("\n> ");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        messages.push(Message::new("user", line.trim_end()));
        let ids = m.tokenizer.encode(&m.tokenizer.chat.render(&messages))?;
        let turn = match gpu_session.as_mut() {
            Some(g) => gpu_turn(g, &m, &ids, &a.sampling),
            None => session
                .generate(&ids, &a.sampling.params(), print_piece)
                .map_err(Into::into),
        };
        match turn {
            Ok((out, stats)) => {
                println!();
                eprintln!("{}", speed(&stats));
                let answer = m.tokenizer.decode(&out, true)?;
                messages.push(Message::new("assistant", &answer));
            }
            Err(e) => {
                // Keep the conversation: drop only the message that could not be answered.
                eprintln!("error: {e}");
                messages.pop();
            }
        }
    }
    Ok(())
}
