//! Function calling: OpenAI's `tools` and `tool_choice`. The model is told the functions
//! (through its chat template when the template knows `tools`, else by `instructions` in a
//! system message) and a call is written as JSON held to its function's parameters by JSON
//! mode's automaton (`json_mode::Schema::ToolCall`): `{"name": ..., "arguments": {...}}`.
//!
//! - `tool_choice: 'auto'` (the default with tools): the answer is a call if it starts with
//!   `{"name"` or `<tool_call>` (the Hermes / Qwen tag), else free text, other JSON included
//!   (`JsonConstraint::optional`).
//! - `'required'`: the answer is a call to one of the functions; `{type: 'function', function:
//!   {name}}`: to that one.
//! - `'none'`: the functions are left out of the prompt and the answer is text.
//!
//! An answer may make up to `MAX_CALLS` calls, one after the other (OpenAI's parallel function
//! calls: whitespace, or `</tool_call>` and `<tool_call>`, between them; after each whole call
//! the answer may end); `parallel_tool_calls: false` holds it to one.

use crate::error::{Error, Result};
use crate::model::chat::ToolPrompt;
use crate::runtime::json_constraint::{
    JsonConstraint, Lead, TokenBytes, TOOL_CALL_END, TOOL_CALL_TAG,
};
use crate::runtime::json_mode::{Functions, Schema};
use crate::runtime::json_schema;
use crate::runtime::json_tagged::Tagged;
use serde_json::Value;
use std::sync::Arc;

/// Most functions one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// Most calls one answer may make (`parallel_tool_calls` not `false`).
pub const MAX_CALLS: usize = 8;

/// One function the model may call.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    /// What its arguments are held to while written.
    pub schema: Arc<Schema>,
    /// What of its parameters schema is not enforced, and why: places that use keywords
    /// outside the enforced subset, left free since the function is not `strict` (the engine
    /// warns).
    pub loose: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    /// This function (an index into `Tools::functions`).
    Function(usize),
}

/// A request's functions and how the model may call them.
#[derive(Debug, Clone)]
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: ToolChoice,
    /// The `tools` list as the request sent it (what a template that knows tools renders).
    pub list: Value,
    /// The system text for a template that does not know tools (`instructions`).
    pub instructions: String,
    /// Most calls an answer may make: `MAX_CALLS`, or 1 with `parallel_tool_calls: false`.
    pub max_calls: usize,
}

/// A call the model wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object as JSON text (OpenAI sends them as a string).
    pub arguments: String,
}

fn bad(at: &str, what: &str) -> Error {
    Error::input(format!("chat request: {at} {what}"))
}

/// OpenAI's rule for function names: 1-64 of a-z, A-Z, 0-9, `_` and `-`.
fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tools {
    /// `tools` and `tool_choice` as the request sent them; `None` when there are no tools
    /// (absent, `null` or `[]`). Errors name the field and the index.
    pub fn parse(tools: Option<&Value>, choice: Option<&Value>) -> Result<Option<Tools>> {
        let list = match tools {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(a)) => a.as_slice(),
            Some(_) => return Err(bad("tools", "must be a list")),
        };
        if list.len() > MAX_TOOLS {
            return Err(bad(
                "tools",
                &format!("has {} functions, more than {MAX_TOOLS}", list.len()),
            ));
        }
        let functions = list
            .iter()
            .enumerate()
            .map(|(i, t)| function(i, t))
            .collect::<Result<Vec<_>>>()?;
        for (i, f) in functions.iter().enumerate() {
            if functions[..i].iter().any(|g| g.name == f.name) {
                return Err(bad(
                    &format!("tools[{i}].function.name"),
                    &format!("`{}` names two functions", f.name),
                ));
            }
        }
        let choice = tool_choice(choice, &functions)?;
        if functions.is_empty() {
            return match choice {
                ToolChoice::None | ToolChoice::Auto => Ok(None),
                _ => Err(bad(
                    "tool_choice",
                    "asks for a call, but there are no tools",
                )),
            };
        }
        let mut t = Tools {
            functions,
            choice,
            list: Value::Array(list.to_vec()),
            instructions: String::new(),
            max_calls: MAX_CALLS,
        };
        t.instructions = t.instructions_text(list);
        Ok(Some(t))
    }

    /// With `parallel_tool_calls` (`None`: the default, several calls).
    pub fn parallel(mut self, parallel: Option<bool>) -> Self {
        self.max_calls = if parallel == Some(false) {
            1
        } else {
            MAX_CALLS
        };
        self
    }

    /// What the model is shown: `None` with `tool_choice: 'none'`.
    pub fn prompt(&self) -> Option<ToolPrompt<'_>> {
        (self.choice != ToolChoice::None).then_some(ToolPrompt {
            list: &self.list,
            instructions: &self.instructions,
        })
    }

    /// What a call is held to: `Schema::ToolCall` over the functions `tool_choice` allows.
    pub fn call_schema(&self) -> Arc<Schema> {
        let fns = match self.choice {
            ToolChoice::Function(i) => &self.functions[i..=i],
            _ => &self.functions[..],
        };
        let fns: Functions = fns
            .iter()
            .map(|f| (f.name.as_bytes().to_vec(), f.schema.clone()))
            .collect();
        Arc::new(Schema::ToolCall(Arc::new(Tagged::call(&fns))))
    }

    /// The constraint on the answer: `None` with `tool_choice: 'none'`.
    pub fn constraint(&self, bytes: Arc<TokenBytes>) -> Option<JsonConstraint> {
        match self.choice {
            ToolChoice::None => None,
            ToolChoice::Auto => Some(JsonConstraint::optional(bytes, self.call_schema())),
            _ => Some(JsonConstraint::new(bytes, self.call_schema())),
        }
        .map(|c| c.calls(self.max_calls))
    }

    /// The system text that describes the functions and the call format, for templates that
    /// do not render `tools` themselves.
    fn instructions_text(&self, list: &[Value]) -> String {
        let mut s = String::from("Functions you can call (their arguments as JSON Schema):\n");
        for t in list {
            let f = &t["function"];
            let mut described = serde_json::Map::new();
            for k in ["name", "description", "parameters"] {
                if let Some(v) = f.get(k).filter(|v| !v.is_null()) {
                    described.insert(k.into(), v.clone());
                }
            }
            s += &Value::Object(described).to_string();
            s.push('\n');
        }
        let format = "reply with only {\"name\": <its name>, \"arguments\": <an object>}";
        s += &match self.choice {
            ToolChoice::Function(i) => format!("Call `{}` now: {format}.", self.functions[i].name),
            ToolChoice::Required => format!("Call one now: {format}."),
            _ => format!("To call one, {format}. Otherwise answer in plain text."),
        };
        s
    }
}

/// A turn's constraint from its functions and its `response_format` schema (`answer`): the
/// calls `tool_choice` asks for; with `auto`, calls or else JSON that follows `answer` in
/// place of free text (OpenAI's tools beside structured output); without tools, `answer`.
pub fn turn_constraint(
    tools: Option<&Tools>,
    answer: Option<Arc<Schema>>,
    bytes: Arc<TokenBytes>,
) -> Option<JsonConstraint> {
    let auto = tools.is_some_and(|t| t.choice == ToolChoice::Auto);
    match (tools.and_then(|t| t.constraint(bytes.clone())), answer) {
        (Some(c), Some(a)) if auto => Some(c.or_answer(a)),
        (Some(c), _) => Some(c),
        (None, a) => a.map(|a| JsonConstraint::new(bytes, a)),
    }
}

fn function(i: usize, t: &Value) -> Result<Function> {
    let at = |k: &str| format!("tools[{i}]{k}");
    let o = t
        .as_object()
        .ok_or_else(|| bad(&at(""), "must be an object"))?;
    match o.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "chat request: {}: tools of type `{other}` are not supported (only `function`)",
                at(".type")
            )))
        }
        None => return Err(bad(&at(".type"), "must be \"function\"")),
    }
    let f = o
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(&at(".function"), "must be an object"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| valid_name(n))
        .ok_or_else(|| {
            bad(
                &at(".function.name"),
                "must be 1-64 letters, digits, `_` or `-`",
            )
        })?;
    if f.get("description").is_some_and(|d| !d.is_string()) {
        return Err(bad(&at(".function.description"), "must be a string"));
    }
    let strict = match f.get("strict") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad(&at(".function.strict"), "must be a boolean")),
    };
    let (schema, loose) = match f.get("parameters") {
        None | Some(Value::Null) => (Arc::new(Schema::Object(Vec::new())), None),
        Some(p) if strict => (
            json_schema::parse_at(p, "tools", &at(".function.parameters"))?,
            None,
        ),
        // Not strict: OpenAI treats the schema as guidance; what cannot be enforced is free.
        Some(p) => {
            let (s, relaxed) = json_schema::parse_loose(p, "tools", &at(".function.parameters"))?;
            (s, (!relaxed.is_empty()).then(|| relaxed.join("; ")))
        }
    };
    Ok(Function {
        name: name.to_string(),
        schema,
        loose,
    })
}

fn tool_choice(v: Option<&Value>, functions: &[Function]) -> Result<ToolChoice> {
    let expected =
        "must be \"none\", \"auto\", \"required\" or {type: \"function\", function: {name}}";
    Ok(match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => return Err(bad("tool_choice", expected)),
        },
        Some(Value::Object(o)) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice.function.name", "must be a string"))?;
            match functions.iter().position(|f| f.name == name) {
                Some(i) => ToolChoice::Function(i),
                None => {
                    return Err(bad(
                        "tool_choice.function.name",
                        &format!("`{name}` is not one of the tools"),
                    ))
                }
            }
        }
        Some(_) => return Err(bad("tool_choice", expected)),
    })
}

/// An answer's text while it may be calls (`tool_choice` other than `'none'`): held back,
/// not shown, until the answer turns out to be text (then it is shown) or calls (then each
/// call's name and arguments stream as its deltas: `stream`); `finish` reads the end.
#[derive(Debug, Clone, Default)]
pub struct HeldCall {
    held: String,
    /// Where the call being written begins in `held` (after the whole ones).
    start: usize,
    /// Where its arguments begin in `held`, once its name is written (`head`).
    args_at: Option<usize>,
    /// Bytes of `held` sent as deltas so far.
    sent: usize,
    /// Bytes of `held` looked at for a call's close so far.
    looked: usize,
    /// The whole calls so far.
    calls: Vec<ToolCall>,
}

/// What a call adds to the stream after a token (`HeldCall::stream`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallDelta {
    /// Which of the answer's calls (0 for the first).
    pub index: usize,
    /// The function's name: in the call's first delta only.
    pub name: Option<String>,
    /// More of the arguments' JSON text, as the model wrote it.
    pub arguments: String,
}

/// How an answer that may have been calls ended (`HeldCall::finish`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEnd {
    /// The calls it made: `calls` the whole ones; `rest` what `stream` has not sent of them
    /// yet; `cut`: one more was cut after its name, before it closed (`max_tokens`, an abort),
    /// and `rest` ends with its arguments so far.
    Calls {
        calls: Vec<ToolCall>,
        rest: Vec<CallDelta>,
        cut: bool,
    },
    /// Not a call, or cut before the first call's name was whole: the held text, to show.
    Text(String),
}

/// JSON whitespace (what the automaton lets through between tokens of the call).
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

/// Whether the answer is, or may be, calls at `lead`.
fn is_call(lead: Option<&Lead>) -> bool {
    matches!(lead, Some(Lead::Json | Lead::Between(_)))
}

/// Where a call's JSON begins in `text`: after whitespace, a `</tool_call>` closing the call
/// before it, and a `<tool_call>` opening it (what the automaton lets through there).
fn json_start(text: &str) -> usize {
    let b = text.as_bytes();
    let mut i = 0;
    for tag in [TOOL_CALL_END, TOOL_CALL_TAG] {
        skip_ws(b, &mut i);
        if b[i..].starts_with(tag) {
            i += tag.len();
        }
    }
    i
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while b.get(*i).copied().is_some_and(is_ws) {
        *i += 1;
    }
}

/// In a call's text, `{"name": "N", "arguments": ` (the only form the automaton lets through,
/// after `json_start`): N and where the arguments' value begins, once it has.
fn head(text: &str) -> Option<(String, usize)> {
    let b = text.as_bytes();
    let mut i = json_start(text);
    for lit in [&b"{"[..], b"\"name\"", b":", b"\""] {
        after(b, &mut i, lit)?;
    }
    let start = i;
    let end = start + b[start..].iter().position(|&c| c == b'"')?;
    i = end + 1;
    for lit in [&b","[..], b"\"arguments\"", b":", b""] {
        after(b, &mut i, lit)?;
    }
    (i < b.len()).then(|| (text[start..end].to_string(), i))
}

/// Moves `i` past whitespace and then `lit`, if `b` has it there.
fn after(b: &[u8], i: &mut usize, lit: &[u8]) -> Option<()> {
    skip_ws(b, i);
    b.get(*i..*i + lit.len()).filter(|x| *x == lit)?;
    *i += lit.len();
    Some(())
}

/// Adds `d` to `out`, into its last delta when that is of the same call.
fn merge(out: &mut Vec<CallDelta>, d: CallDelta) {
    match out.last_mut() {
        Some(last) if last.index == d.index => {
            last.name = last.name.take().or(d.name);
            last.arguments += &d.arguments;
        }
        _ if d.name.is_none() && d.arguments.is_empty() => {}
        _ => out.push(d),
    }
}

impl HeldCall {
    /// Of `piece` (a token's text, after which the turn's constraint stands at `lead`), what
    /// to show now: `None` while the answer may still be, or is, calls.
    pub fn push(&mut self, lead: Option<&Lead>, piece: &str) -> Option<String> {
        match lead {
            Some(Lead::Json | Lead::Undecided(_) | Lead::Between(_)) => {
                self.held.push_str(piece);
                None
            }
            _ => Some(std::mem::take(&mut self.held) + piece),
        }
    }

    /// What the calls add to the stream now: each call's name once written (its first
    /// delta), then its arguments' text as it comes, less a tail of whitespace and `}` that
    /// may be the call's own close until the call is whole. Empty when there is nothing new
    /// (or the answer is not calls).
    pub fn stream(&mut self, lead: Option<&Lead>) -> Vec<CallDelta> {
        let mut out = Vec::new();
        if is_call(lead) {
            while self.step(&mut out) {}
        }
        out
    }

    /// `stream` for the call being written; whether it became whole (the next may follow).
    fn step(&mut self, out: &mut Vec<CallDelta>) -> bool {
        let index = self.calls.len();
        let mut name = None;
        if self.args_at.is_none() {
            let Some((n, at)) = head(&self.held[self.start..]) else {
                return false;
            };
            (self.args_at, self.sent, name) = (Some(self.start + at), self.start + at, Some(n));
        }
        // Parsed only when it may have just closed: when a `}` came since the last look.
        let closes = self.held[self.looked.max(self.start)..].contains('}');
        self.looked = self.held.len();
        let whole = closes
            .then(|| ToolCall::read(&self.held[self.start..]))
            .flatten();
        let end = match &whole {
            // The arguments end where the call's own `}` begins.
            Some((_, len)) => {
                let close = self.start + len - 1;
                self.held[..close].trim_end().len()
            }
            None => self
                .held
                .trim_end_matches(|c: char| c.is_ascii() && is_ws(c as u8) || c == '}')
                .len(),
        }
        .max(self.sent);
        let arguments = self.held[self.sent..end].to_string();
        self.sent = end;
        merge(
            out,
            CallDelta {
                index,
                name,
                arguments,
            },
        );
        let Some((call, len)) = whole else {
            return false;
        };
        self.calls.push(call);
        self.start += len;
        // What follows the call (the next one, held at once) is looked at afresh.
        (self.args_at, self.sent, self.looked) = (None, self.start, self.start);
        true
    }

    /// At the answer's end: the calls (the last perhaps cut short), or the text to show.
    pub fn finish(&mut self, lead: Option<&Lead>) -> CallEnd {
        if !is_call(lead) {
            return CallEnd::Text(std::mem::take(&mut self.held));
        }
        let mut rest = self.stream(lead);
        let cut = self.args_at.is_some();
        if cut {
            let arguments = self.held[self.sent..].to_string();
            let index = self.calls.len();
            merge(
                &mut rest,
                CallDelta {
                    index,
                    name: None,
                    arguments,
                },
            );
        }
        if self.calls.is_empty() && !cut {
            return CallEnd::Text(std::mem::take(&mut self.held));
        }
        // What follows the last whole call without a name (cut while it opened) is dropped.
        CallEnd::Calls {
            calls: std::mem::take(&mut self.calls),
            rest,
            cut,
        }
    }
}

impl ToolCall {
    /// The call in an answer the constraint held to `Schema::ToolCall` (whitespace and
    /// `<tool_call>` before it allowed), its arguments as the model wrote them; `None` when
    /// the answer ended before the call did (`max_tokens`).
    pub fn parse(answer: &str) -> Option<ToolCall> {
        let (call, len) = Self::read(answer)?;
        answer[len..].trim_start().is_empty().then_some(call)
    }

    /// The call `text` begins with and the length of its text (to its closing `}`), whatever
    /// follows; `None` until the call is whole.
    fn read(text: &str) -> Option<(ToolCall, usize)> {
        let (name, at) = head(text)?;
        let start = json_start(text);
        let mut values = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
        let v = values.next()?.ok()?;
        v.get("arguments")?.as_object()?;
        let len = start + values.byte_offset();
        let close = len - 1;
        let call = ToolCall {
            name,
            arguments: text[at..close].trim_end().to_string(),
        };
        Some((call, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::json_mode::JsonPrefix;
    use serde_json::json;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}})
    }

    fn time() -> Value {
        json!({"type": "function", "function": {"name": "get_time",
            "parameters": {"type": "object", "properties": {"zone": {"type": "integer"}},
                "required": ["zone"]}}})
    }

    fn tools(choice: Value) -> Tools {
        Tools::parse(Some(&json!([weather(), time()])), Some(&choice))
            .unwrap()
            .unwrap()
    }

    fn accepts(t: &Tools, text: &str) -> bool {
        let mut p = JsonPrefix::new(t.call_schema());
        p.feed(text.as_bytes()) && p.is_complete()
    }

    #[test]
    fn a_call_follows_the_parameters_of_the_function_it_names() {
        let t = tools(json!("required"));
        for ok in [
            r#"{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}"#,
            r#"{"name":"get_time","arguments":{"zone":-5}}"#,
        ] {
            assert!(accepts(&t, ok), "{ok}");
        }
        for bad in [
            // the other function's arguments
            r#"{"name": "get_time", "arguments": {"city": "Paris", "unit": "celsius"}}"#,
            // arguments before the name
            r#"{"arguments": {"zone": 1}, "name": "get_time"}"#,
            r#"{"name": "get_date", "arguments": {}}"#,
            r#"{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}"#,
            r#"{"name": "get_time", "arguments": {"zone": 1.5}}"#,
            r#"{"name": "get_time"}"#,
            r#"{"name": "get_time", "arguments": {"zone": 1}, "extra": 1}"#,
        ] {
            assert!(!accepts(&t, bad), "{bad}");
        }
        let one = tools(json!({"type": "function", "function": {"name": "get_time"}}));
        assert_eq!(one.choice, ToolChoice::Function(1));
        assert!(accepts(
            &one,
            r#"{"name":"get_time","arguments":{"zone":0}}"#
        ));
        assert!(!accepts(
            &one,
            r#"{"name":"get_weather","arguments":{"city":"x","unit":"celsius"}}"#
        ));
    }

    #[test]
    fn no_tools_is_none_and_bad_tools_name_the_field() {
        assert!(Tools::parse(None, None).unwrap().is_none());
        assert!(Tools::parse(Some(&json!([])), Some(&json!("auto")))
            .unwrap()
            .is_none());
        let cases = [
            (json!({}), json!(null), "tools must be a list"),
            (json!([1]), json!(null), "tools[0] must be an object"),
            (
                json!([{"type": "code_interpreter"}]),
                json!(null),
                "tools[0].type",
            ),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!(null),
                "tools[0].function.name",
            ),
            (
                json!([weather(), weather()]),
                json!(null),
                "tools[1].function.name",
            ),
            (json!([weather()]), json!("always"), "tool_choice"),
            (
                json!([weather()]),
                json!({"type": "function", "function": {"name": "nope"}}),
                "`nope` is not one of the tools",
            ),
            (json!([]), json!("required"), "no tools"),
            (
                json!([{"type": "function", "function": {"name": "f", "strict": true,
                    "parameters": {"type": "object", "properties": {"n": {"type": "array", "uniqueItems": true}}}}}]),
                json!(null),
                "tools[0].function.parameters.properties.n.uniqueItems",
            ),
        ];
        for (tools, choice, want) in cases {
            let e = Tools::parse(Some(&tools), Some(&choice)).unwrap_err();
            assert!(e.to_string().contains(want), "{tools} {choice}: {e}");
        }
    }

    /// Not strict: what the automaton cannot enforce is left out and said (a keyword that only
    /// narrows; a place it cannot hold to at all is any value); the rest still holds (here `n`
    /// an array, `m`, and no other keys).
    #[test]
    fn a_loose_schema_that_is_not_strict_is_free_where_unsupported_and_says_where() {
        let t = Tools::parse(
            Some(&json!([{"type": "function", "function": {"name": "f",
                "parameters": {"type": "object", "properties": {
                    "n": {"type": "array", "uniqueItems": true},
                    "m": {"type": "integer"}}, "required": ["m"]}}}])),
            None,
        )
        .unwrap()
        .unwrap();
        let why = t.functions[0].loose.as_deref().unwrap();
        assert!(
            why.contains("tools[0].function.parameters.properties.n.uniqueItems"),
            "{why}"
        );
        // `uniqueItems` left out: `n` is still an array, its items need not differ.
        assert!(accepts(&t, r#"{"name":"f","arguments":{"n":[1,1],"m":1}}"#));
        assert!(accepts(
            &t,
            r#"{"name":"f","arguments":{"m":-2,"n":["a",{}]}}"#
        ));
        for bad in [
            r#"{"name":"f","arguments":{"n":"x","m":1}}"#,
            r#"{"name":"f","arguments":{"n":[]}}"#,
            r#"{"name":"f","arguments":{"m":1.5}}"#,
            r#"{"name":"f","arguments":{"m":1,"k":2}}"#,
        ] {
            assert!(!accepts(&t, bad), "{bad}");
        }
        // A top level the automaton cannot hold to: any object.
        let t = Tools::parse(
            Some(&json!([{"type": "function", "function": {"name": "f",
                "parameters": {"type": "object", "minProperties": 1}}}])),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(*t.functions[0].schema, Schema::AnyObject);
        assert!(t.functions[0]
            .loose
            .as_deref()
            .unwrap()
            .contains("minProperties"));
    }

    #[test]
    fn the_prompt_lists_the_functions_unless_the_choice_is_none() {
        let t = tools(json!("auto"));
        let p = t.prompt().unwrap();
        assert_eq!(p.list.as_array().unwrap().len(), 2);
        assert!(p.instructions.contains(r#""name":"get_weather""#));
        assert!(p.instructions.contains("Otherwise answer in plain text"));
        assert!(tools(json!("required"))
            .instructions
            .contains("Call one now"));
        assert!(tools(json!("none")).prompt().is_none());
        assert!(tools(json!("none"))
            .constraint(Arc::new(Vec::new()))
            .is_none());
    }

    #[test]
    fn calls_are_read_back_from_the_answer() {
        let c =
            ToolCall::parse(" <tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": 2}}")
                .unwrap();
        assert_eq!(c.name, "get_time");
        assert_eq!(c.arguments, r#"{"zone": 2}"#);
        assert_eq!(ToolCall::parse(r#"{"name": "get_time", "argum"#), None);
    }

    /// A call streamed token by token: the name in the first delta, then the arguments' text,
    /// less a tail that may be the call's own `}`; the pieces add up to the call.
    #[test]
    fn a_call_streams_its_name_then_its_arguments() {
        let json = Some(&Lead::Json);
        let pieces = [
            " <tool_call>",
            "\n{\"na",
            "me\": \"get",
            "_time\"",
            ", \"arguments\": ",
            "{\"zone\"",
            ": {\"h\": 2}",
            "}",
            " }",
        ];
        let mut h = HeldCall::default();
        let mut deltas = Vec::new();
        for p in pieces {
            assert_eq!(h.push(json, p), None);
            deltas.extend(h.stream(json));
        }
        assert_eq!(deltas[0].name.as_deref(), Some("get_time"));
        assert!(deltas[1..].iter().all(|d| d.name.is_none() && d.index == 0));
        let CallEnd::Calls { calls, rest, cut } = h.finish(json) else {
            panic!("not a call")
        };
        assert!(!cut && rest.is_empty(), "{rest:?}");
        let streamed: String = deltas.iter().map(|d| d.arguments.as_str()).collect();
        assert_eq!(streamed, r#"{"zone": {"h": 2}}"#);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].arguments, streamed);
        // Unstreamed (the CLI): the name and the whole arguments at the end.
        let mut h = HeldCall::default();
        for p in pieces {
            h.push(json, p);
        }
        let CallEnd::Calls { rest, .. } = h.finish(json) else {
            panic!("not a call")
        };
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].name.as_deref(), Some("get_time"));
        assert_eq!(rest[0].arguments, r#"{"zone": {"h": 2}}"#);
        // Cut after the name: the arguments so far; before it: text.
        let mut h = HeldCall::default();
        h.push(json, r#"{"name": "f", "arguments": {"a"#);
        let first = h.stream(json);
        assert_eq!(
            (first[0].name.as_deref(), first[0].arguments.as_str()),
            (Some("f"), r#"{"a"#)
        );
        h.push(json, r#"": 1"#);
        let d = |arguments: &str| CallDelta {
            index: 0,
            name: None,
            arguments: arguments.into(),
        };
        assert_eq!(
            h.finish(json),
            CallEnd::Calls {
                calls: vec![],
                rest: vec![d(r#"": 1"#)],
                cut: true
            }
        );
        let mut h = HeldCall::default();
        h.push(json, r#"{"name": "f"#);
        assert_eq!(h.stream(json), vec![]);
        assert_eq!(h.finish(json), CallEnd::Text(r#"{"name": "f"#.into()));
        // Text: shown with what was held before it.
        let mut h = HeldCall::default();
        assert_eq!(h.push(Some(&Lead::Undecided(vec![b' '])), " "), None);
        assert_eq!(h.push(Some(&Lead::Text), "Hi").as_deref(), Some(" Hi"));
    }

    /// Tools beside a `response_format` schema: with `auto` the answer is calls or that
    /// schema's JSON, never free text nor an empty answer; `required`: a call; `none`: the JSON.
    #[test]
    fn beside_a_response_schema_an_answer_is_calls_or_that_json() {
        let answer = crate::runtime::json_schema::parse(&json!({"type": "object",
            "properties": {"summary": {"type": "string"}}, "required": ["summary"]}))
        .unwrap();
        let mut table: TokenBytes = (0..=255u8).map(|b| Some(vec![b])).collect();
        table.push(None);
        let table = Arc::new(table);
        let end = 256;
        let write = |c: &mut JsonConstraint, text: &str| {
            text.bytes()
                .map(|b| c.allowed(&[(b as u32, 0.0)], 0).is_ok() && c.advance(b as u32))
                .last()
                .unwrap_or(false)
        };
        let with = |choice: Value| {
            let t = tools(choice);
            turn_constraint(Some(&t), Some(answer.clone()), table.clone()).unwrap()
        };
        let call = r#" {"name": "get_time", "arguments": {"zone": 1}}"#;
        let json = r#"{"summary": "It is sunny."}"#;
        let mut c = with(json!("auto"));
        assert!(
            !write(&mut c, call) && *c.lead() == Lead::Between(vec![]),
            "a call"
        );
        let mut c = with(json!("auto"));
        assert!(
            write(&mut c, json) && *c.lead() == Lead::Answer,
            "the JSON, whole"
        );
        let mut c = with(json!("auto"));
        assert!(c.allowed(&[(end, 0.0)], 0).is_err(), "an empty answer");
        assert!(c.allowed(&[(b'I' as u32, 0.0)], 0).is_err(), "free text");
        assert!(!write(&mut c, r#"{"summary": 1}"#), "JSON off the schema");
        let mut c = with(json!("required"));
        assert!(!write(&mut c, json), "required: only a call");
        let none = tools(json!("none"));
        let mut c = turn_constraint(Some(&none), Some(answer.clone()), table.clone()).unwrap();
        assert!(write(&mut c, json), "none: the JSON");
        assert!(turn_constraint(Some(&none), None, table.clone()).is_none());
    }

    /// Several calls in one answer: the automaton lets a second call follow a whole one (after
    /// whitespace or `</tool_call>`), and the answer may end after any whole call, never
    /// inside one nor with text after it; `parallel_tool_calls: false` ends it after the first.
    #[test]
    fn parallel_calls_follow_one_another() {
        let t = tools(json!("required"));
        let a = r#"{"name": "get_time", "arguments": {"zone": 1}}"#;
        let b = r#"{"name":"get_weather","arguments":{"city":"Oslo","unit":"celsius"}}"#;
        // One token per byte, then an end-of-turn token (id 256).
        let mut table: TokenBytes = (0..=255u8).map(|b| Some(vec![b])).collect();
        table.push(None);
        let table = Arc::new(table);
        let end = 256;
        let run = |c: &mut JsonConstraint, text: &str| {
            text.bytes().all(|b| {
                let ok = c.allowed(&[(b as u32, 0.0)], 0).is_ok();
                ok && !c.advance(b as u32)
            })
        };
        let ends = |c: &JsonConstraint| c.allowed(&[(end, 0.0)], 0).is_ok();
        for sep in ["\n", " \n ", "</tool_call>\n<tool_call>", ""] {
            let mut c = t.constraint(table.clone()).unwrap();
            assert!(
                run(&mut c, &a[..a.len() - 1]) && !ends(&c),
                "the end inside a call"
            );
            assert!(run(&mut c, "}"));
            assert!(matches!(c.lead(), Lead::Between(_)) && ends(&c));
            assert!(run(&mut c, sep), "{sep:?}");
            assert!(run(&mut c, b));
            assert!(ends(&c));
            assert!(
                c.allowed(&[(b'H' as u32, 0.0)], 0).is_err(),
                "text after calls"
            );
        }
        // Where the model's own draw decides: after whitespace and a whole `</tool_call>`, not
        // while a close or an opening is half written.
        let mut c = t.constraint(table.clone()).unwrap();
        assert!(run(&mut c, a) && c.between_calls());
        for (more, free) in [
            (" </tool_ca", false),
            ("ll>", true),
            ("\n", true),
            ("{", false),
        ] {
            assert!(run(&mut c, more));
            assert_eq!(c.between_calls(), free, "{more:?}");
        }
        let mut c = t.constraint(table.clone()).unwrap();
        assert!(run(&mut c, a) && run(&mut c, &" ".repeat(32)));
        assert!(
            c.allowed(&[(b' ' as u32, 0.0)], 0).is_err(),
            "endless whitespace"
        );
        assert!(ends(&c));
        // At most MAX_CALLS: the last one ends the answer.
        let mut c = t.constraint(table.clone()).unwrap();
        for _ in 1..MAX_CALLS {
            assert!(run(&mut c, a) && run(&mut c, "\n"));
        }
        assert!(!run(&mut c, a), "the last call does not end the answer");
        // parallel_tool_calls: false
        let one = tools(json!("required")).parallel(Some(false));
        let mut c = one.constraint(table.clone()).unwrap();
        assert!(!run(&mut c, a), "one call does not end the answer");
        // Held and streamed: two calls, each with its index, name first.
        let mut h = HeldCall::default();
        let lead = Some(&Lead::Json);
        let text = format!(" <tool_call>{a}</tool_call>\n<tool_call>\n{b}");
        let mut got = Vec::new();
        for piece in text.as_bytes().chunks(5) {
            h.push(lead, std::str::from_utf8(piece).unwrap());
            got.extend(h.stream(lead));
        }
        let CallEnd::Calls { calls, rest, cut } = h.finish(Some(&Lead::Between(vec![]))) else {
            panic!("not calls")
        };
        assert!(!cut && rest.is_empty(), "{cut} {rest:?} {got:?}");
        assert_eq!(
            calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["get_time", "get_weather"]
        );
        for (i, call) in calls.iter().enumerate() {
            let mine: Vec<&CallDelta> = got.iter().filter(|d| d.index == i).collect();
            assert_eq!(mine[0].name.as_deref(), Some(call.name.as_str()));
            let args: String = mine.iter().map(|d| d.arguments.as_str()).collect();
            assert_eq!(args, call.arguments);
        }
        // Unstreamed (the CLI): both calls read at the end.
        let mut h = HeldCall::default();
        h.push(lead, &text);
        let CallEnd::Calls { calls, rest, cut } = h.finish(lead) else {
            panic!("not calls")
        };
        assert_eq!((calls.len(), rest.len(), cut), (2, 2, false));
        assert_eq!(
            (rest[1].index, rest[1].name.as_deref()),
            (1, Some("get_weather"))
        );
        // Cut while the second call opens: the first alone, whole.
        let mut h = HeldCall::default();
        h.push(lead, &format!("{a}\n{{\"na"));
        let CallEnd::Calls { calls, cut, .. } = h.finish(lead) else {
            panic!("not calls")
        };
        assert_eq!((calls.len(), cut), (1, false));
    }
}
