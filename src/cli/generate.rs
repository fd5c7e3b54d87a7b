//! `generate` (one prompt, streamed) and `chat` (the terminal chat) on any engine: a model
//! file on the CPU reference, or a built ensemble on a backend, walking its trajectory when a
//! budget is set (`/budget MB` in the chat).

use super::engine::{budget_bytes, with_engine, Block, Engine, Job, SourceArgs};
use super::SamplingArgs;
use anyhow::Result;
use clap::Args;
use flexquant::model::chat::{ChatTemplate, Message};
use flexquant::model::tokenizer::{StreamDecoder, Tokenizer};
use flexquant::runtime::json_mode::Schema;
use flexquant::runtime::json_schema;
use flexquant::runtime::tools::{turn_constraint, CallEnd, HeldCall, ToolCall, Tools};
use flexquant::runtime::{Backend, Factory, GenStats, StopReason, TurnOptions};
use std::io::{BufRead, Write};
use std::sync::Arc;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    source: SourceArgs,
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
    /// Functions the model may call: a JSON file holding the browser's `tools` list
    /// (`[{"type": "function", "function": {name, description, parameters}}]`); with --chat.
    #[arg(long, value_name = "FILE", requires = "chat")]
    tools: Option<std::path::PathBuf>,
    /// `auto` (the default), `required`, `none`, or the name of the function to call.
    #[arg(long, value_name = "CHOICE", requires = "tools")]
    tool_choice: Option<String>,
    /// `false`: at most one call per answer (OpenAI's `parallel_tool_calls`; by default an
    /// answer may make several, one after the other).
    #[arg(long, value_name = "BOOL", requires = "tools")]
    parallel_tool_calls: Option<bool>,
}

/// `--tools` and `--tool-choice` as the browser's request fields.
fn read_tools(a: &GenerateArgs) -> Result<Option<Tools>> {
    let Some(path) = &a.tools else {
        return Ok(None);
    };
    let text = super::read_text(path)?;
    let list: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not JSON ({e})", path.display()))?;
    let choice = a.tool_choice.as_deref().map(|c| match c {
        "auto" | "required" | "none" => serde_json::json!(c),
        name => serde_json::json!({"type": "function", "function": {"name": name}}),
    });
    let tools = Tools::parse(Some(&list), choice.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(tools.map(|t| t.parallel(a.parallel_tool_calls)))
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// System prompt (default: the model's own).
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

fn speed(s: &GenStats) -> String {
    format!(
        "[{} prompt tokens ({} run) in {:.2} s, {} tokens at {:.1} tok/s, stopped by {}]",
        s.prompt_tokens,
        s.prefilled,
        s.prefill_seconds,
        s.generated,
        s.generated as f64 / s.decode_seconds.max(1e-9),
        s.stopped_by.map_or("-", StopReason::as_str)
    )
}

impl<F: Factory> Engine<F>
where
    <F::Model as Backend>::Error: Send + Sync + 'static,
{
    /// One answer after `ids`, each piece of text printed as it comes; between tokens the
    /// controller may swap modules (printed on stderr).
    fn answer(&mut self, ids: &[u32], a: &SamplingArgs, tools: Option<&Tools>) -> Result<Answer> {
        let stop = self.tokenizer.stop.clone();
        let (sampling, mut stop_text) = a.checked()?;
        let schema = match &a.json_schema {
            Some(path) => {
                let text = super::read_text(path)?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{}: not JSON ({e})", path.display()))?;
                Some(
                    json_schema::parse(&v)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                )
            }
            None => a.json_object.then(|| Arc::new(Schema::AnyObject)),
        };
        let json = turn_constraint(tools, schema, self.tokenizer.token_bytes());
        // An answer that may be a function call is held back until it is known.
        let mut held = json
            .as_ref()
            .filter(|_| tools.is_some())
            .map(|_| HeldCall::default());
        let opts = TurnOptions {
            json,
            ..TurnOptions::default()
        };
        let mut turn = self.read_prompt(ids, &sampling, &stop, opts)?;
        let mut dec = StreamDecoder::default();
        let mut out = std::io::stdout();
        let mut text = String::new();
        loop {
            let next = self.run.session.next(&mut turn).block()?;
            let Some(id) = next else { break };
            let piece = dec.step(&self.tokenizer, id)?;
            let piece = match held.as_mut() {
                Some(h) => h.push(turn.lead(), &piece).unwrap_or_default(),
                None => piece,
            };
            let shown = stop_text.push(&piece);
            print!("{shown}");
            out.flush()?;
            text += &shown;
            if stop_text.stopped() {
                turn.stop(StopReason::Eos);
                break;
            }
            self.between_tokens(Some(turn.out.len()));
        }
        let mut rest = stop_text.finish();
        let calls = match held.as_mut().map(|h| h.finish(turn.lead())) {
            // Never streamed here, so a call cut short comes back as text.
            Some(CallEnd::Calls {
                calls,
                rest: r,
                cut,
            }) => {
                if let Some(d) = r.last().filter(|_| cut) {
                    rest += &d.arguments;
                }
                calls
            }
            Some(CallEnd::Text(unheld)) => {
                rest += &unheld;
                Vec::new()
            }
            None => Vec::new(),
        };
        print!("{rest}");
        text += &rest;
        for (i, c) in calls.iter().enumerate() {
            let sep = if i > 0 { "\n" } else { "" };
            print!("{sep}[tool call] {} {}", c.name, c.arguments);
        }
        Ok(Answer {
            ids: turn.out,
            stats: turn.stats,
            text,
            calls,
        })
    }
}

/// What `answer` generated: the tokens, the text shown (cut at a stop sequence) and stats.
struct Answer {
    ids: Vec<u32>,
    text: String,
    stats: GenStats,
    /// The function calls the answer made (`--tools`).
    calls: Vec<ToolCall>,
}

struct Generate(GenerateArgs);

impl Job for Generate {
    fn run<F: Factory>(self, mut e: Engine<F>) -> Result<()>
    where
        <F::Model as Backend>::Error: Send + Sync + 'static,
    {
        let a = self.0;
        eprintln!("[{}]", e.describe());
        let tools = read_tools(&a)?;
        for f in tools.iter().flat_map(|t| &t.functions) {
            if let Some(why) = &f.loose {
                eprintln!(
                    "[warning: `{}`'s arguments are held to be an object only: {why}]",
                    f.name
                );
            }
        }
        let text = if a.chat {
            warn_if_fallback(&e.tokenizer.chat);
            let prompt = tools.as_ref().and_then(|t| t.prompt());
            e.tokenizer
                .chat
                .render_with_tools(&[Message::new("user", &a.prompt)], prompt)?
        } else {
            a.prompt.clone()
        };
        let ids = e.tokenizer.encode(&text)?;
        let Answer {
            ids: out,
            stats,
            calls,
            ..
        } = e.answer(&ids, &a.sampling, tools.as_ref())?;
        println!();
        eprintln!("{}", speed(&stats));
        if a.json {
            let calls: Vec<_> = calls
                .iter()
                .map(|c| serde_json::json!({"name": c.name, "arguments": c.arguments}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"ids": out, "stats": stats, "step": e.run.step,
                    "bits": e.run.session.model.eqm_bits(), "tool_calls": calls})
            );
        }
        Ok(())
    }
}

/// Says so when prompts are ChatML because the model has no chat template.
fn warn_if_fallback(chat: &ChatTemplate) {
    if let Some(w) = chat.fallback_warning() {
        eprintln!("[warning: {w}]");
    }
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    if a.prompt.trim().is_empty() {
        anyhow::bail!("--prompt is empty");
    }
    a.sampling.checked()?;
    let (s, c) = (a.source.clone(), a.sampling.context);
    with_engine(&s, c, Generate(a))
}

struct Chat(ChatArgs);

/// A chat command (`/budget MB`, `/budget off`, `/step`), or `None` for a message.
fn command<F: Factory>(e: &mut Engine<F>, line: &str) -> Option<Result<()>>
where
    <F::Model as Backend>::Error: Send + Sync + 'static,
{
    let mut words = line.split_whitespace();
    match words.next()? {
        "/budget" => Some(match words.next() {
            Some("off") => e.set_budget(None),
            Some(mb) => match mb.parse::<f64>() {
                Ok(mb) => budget_bytes(mb).and_then(|b| e.set_budget(Some(b))),
                Err(_) => Err(anyhow::anyhow!(
                    "/budget {mb}: expected a number of MB or 'off'"
                )),
            },
            None => Err(anyhow::anyhow!("usage: /budget MB | /budget off")),
        }),
        "/step" => Some(Ok(())),
        _ => None,
    }
}

impl Job for Chat {
    fn run<F: Factory>(self, mut e: Engine<F>) -> Result<()>
    where
        <F::Model as Backend>::Error: Send + Sync + 'static,
    {
        let a = self.0;
        let mut messages: Vec<Message> =
            a.system.iter().map(|s| Message::new("system", s)).collect();
        println!("chatting with {}", e.describe());
        warn_if_fallback(&e.tokenizer.chat);
        println!("(empty line or Ctrl-D quits; /budget MB or /budget off moves along the trajectory; /step shows where it is)");
        let stdin = std::io::stdin();
        loop {
            print!("\n> ");
            std::io::stdout().flush()?;
            let mut line = String::new();
            if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some(r) = command(&mut e, line.trim()) {
                match r {
                    Ok(()) => println!("[{}]", e.describe()),
                    Err(err) => eprintln!("error: {err:#}"),
                }
                continue;
            }
            messages.push(Message::new("user", line.trim_end()));
            let ids = prompt_ids(&e.tokenizer, &messages);
            match ids.and_then(|ids| e.answer(&ids, &a.sampling, None)) {
                Ok(answer) => {
                    println!();
                    eprintln!("{}", speed(&answer.stats));
                    messages.push(Message::new("assistant", &answer.text));
                }
                Err(err) => {
                    // Keep the conversation: drop only the message that could not be answered.
                    eprintln!("error: {err:#}");
                    messages.pop();
                }
            }
        }
        Ok(())
    }
}

/// The conversation in the model's chat template, tokenized (a template may reject it).
fn prompt_ids(t: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
    Ok(t.encode(&t.chat.render(messages)?)?)
}

pub fn run_chat(a: ChatArgs) -> Result<()> {
    a.sampling.checked()?;
    let (s, c) = (a.source.clone(), a.sampling.context);
    with_engine(&s, c, Chat(a))
}
