//! Function calls in a conversation, for the two kinds of template: one that renders `tools`
//! and calls itself gets them as `transformers` passes them; one that does not gets the
//! conversation rewritten into plain messages it can render.

use super::{ChatTemplate, Message};
use serde_json::{json, Value};

/// Whether `t` renders the `tools` it is given: it writes a probe function's name.
pub fn knows_tools(t: &ChatTemplate) -> bool {
    const PROBE: &str = "flexquant_probe_function";
    let tools = json!([{"type": "function", "function": {"name": PROBE,
        "description": "probe", "parameters": {"type": "object", "properties": {}}}}]);
    t.render_raw(&[Message::new("user", "x")], Some(&tools))
        .is_ok_and(|text| text.contains(PROBE))
}

/// `tool_calls[].function.arguments` sent as JSON text (OpenAI's form) become objects, the
/// form templates expect (they write `arguments | tojson`).
pub fn arguments_as_objects(messages: &[Message]) -> Vec<Message> {
    let mut out = messages.to_vec();
    for call in out
        .iter_mut()
        .flat_map(|m| m.tool_calls.iter_mut().flatten())
    {
        let parsed = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .and_then(|s| serde_json::from_str::<Value>(s).ok());
        if let (Some(v), Some(f)) = (parsed, call.get_mut("function")) {
            f["arguments"] = v;
        }
    }
    out
}

/// The call as the model is asked to write it (`runtime::tools`): `{"name": ..., "arguments":
/// ...}`, name first.
fn call_text(call: &Value) -> String {
    let f = &call["function"];
    let args = match &f["arguments"] {
        Value::String(s) => serde_json::from_str::<Value>(s).unwrap_or_else(|_| json!(s)),
        v => v.clone(),
    };
    format!("{{\"name\": {}, \"arguments\": {}}}", f["name"], args)
}

/// For a template that does not know tools: `instructions` (the functions and the call
/// format) at the end of the system message, or as one; each assistant call written as JSON
/// in its content; each tool result as a user message naming the function (results in a row
/// merged), since templates that check roles know only system, user and assistant.
pub fn for_plain_template(messages: &[Message], instructions: Option<&str>) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    if let Some(text) = instructions {
        match messages.first() {
            Some(m) if m.role == "system" => {}
            _ => out.push(Message::new("system", text)),
        }
    }
    let mut names: Vec<(String, String)> = Vec::new();
    let mut after_result = false;
    for (i, m) in messages.iter().enumerate() {
        let mut m = m.clone();
        if i == 0 && m.role == "system" {
            if let Some(text) = instructions {
                m.content = format!("{}\n\n{text}", m.content);
            }
        }
        if let Some(calls) = m.tool_calls.take() {
            for c in &calls {
                if let (Some(id), Some(name)) = (
                    c.get("id").and_then(Value::as_str),
                    c.pointer("/function/name").and_then(Value::as_str),
                ) {
                    names.push((id.to_string(), name.to_string()));
                }
            }
            let written = calls.iter().map(call_text);
            m.content = std::iter::once(m.content)
                .filter(|c| !c.is_empty())
                .chain(written)
                .collect::<Vec<_>>()
                .join("\n");
        }
        if m.role != "tool" {
            after_result = false;
            out.push(m);
            continue;
        }
        let name = m
            .tool_call_id
            .as_ref()
            .and_then(|id| names.iter().find(|(i, _)| i == id))
            .map(|(_, n)| n.clone())
            .or(m.name.clone())
            .unwrap_or_else(|| "the function".into());
        let text = format!("Result of {name}: {}", m.content);
        match out.last_mut() {
            Some(prev) if after_result => prev.content = format!("{}\n{text}", prev.content),
            _ => out.push(Message::new("user", &text)),
        }
        after_result = true;
    }
    out
}
