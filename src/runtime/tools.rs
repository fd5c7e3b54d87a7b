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
//! One call per answer (`parallel_tool_calls` asks for at most that many, so it is accepted).

use crate::error::{Error, Result};
use crate::model::chat::ToolPrompt;
use crate::runtime::json_mode::{
    Functions, JsonConstraint, Lead, Schema, TokenBytes, TOOL_CALL_TAG,
};
use crate::runtime::json_schema;
use crate::runtime::json_tagged::Tagged;
use serde_json::Value;
use std::sync::Arc;

/// Most functions one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// One function the model may call.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    /// What its arguments are held to while written.
    pub schema: Arc<Schema>,
    /// Why its arguments are only held to be an object: its parameters schema uses keywords
    /// outside the enforced subset and it is not `strict` (the engine warns).
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
        };
        t.instructions = t.instructions_text(list);
        Ok(Some(t))
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
        Some(p) => match json_schema::parse_at(p, "tools", &at(".function.parameters")) {
            Ok(s) => (s, None),
            // Not strict: OpenAI treats the schema as guidance; the call is still an object.
            Err(Error::Unsupported(why)) if !strict => (Arc::new(Schema::AnyObject), Some(why)),
            Err(e) => return Err(e),
        },
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

/// An answer's text while it may be a call (`tool_choice` other than `'none'`): held back,
/// not shown, until the answer turns out to be text (then it is shown) or a call (then its
/// name and arguments stream as the call's deltas: `stream`); `finish` reads the end.
#[derive(Debug, Clone, Default)]
pub struct HeldCall {
    held: String,
    /// Where the arguments begin in `held`, once the name is written (`head`).
    args_at: Option<usize>,
    /// Bytes of `held` sent as the call's deltas so far.
    sent: usize,
}

/// What a call adds to the stream after a token (`HeldCall::stream`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallDelta {
    /// The function's name: in the call's first delta only.
    pub name: Option<String>,
    /// More of the arguments' JSON text, as the model wrote it.
    pub arguments: String,
}

/// How an answer that may have been a call ended (`HeldCall::finish`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEnd {
    /// A whole call; `rest`: what `stream` has not sent of it yet.
    Called { call: ToolCall, rest: CallDelta },
    /// A call whose name was sent, cut before it closed (`max_tokens`, an abort): the rest of
    /// its arguments so far.
    Cut(CallDelta),
    /// Not a call, or cut before its name was whole: the held text, to show.
    Text(String),
}

/// JSON whitespace (what the automaton lets through between tokens of the call).
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

/// In a call's text, `{"name": "N", "arguments": ` (the only form the automaton lets through,
/// after whitespace and an optional `<tool_call>`): N and where the arguments' value begins,
/// once it has.
fn head(text: &str) -> Option<(String, usize)> {
    let b = text.as_bytes();
    let mut i = b.iter().position(|c| !c.is_ascii_whitespace())?;
    if b[i..].starts_with(TOOL_CALL_TAG) {
        i += TOOL_CALL_TAG.len();
    }
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
    while b.get(*i).copied().is_some_and(is_ws) {
        *i += 1;
    }
    b.get(*i..*i + lit.len()).filter(|x| *x == lit)?;
    *i += lit.len();
    Some(())
}

impl HeldCall {
    /// Of `piece` (a token's text, after which the turn's constraint stands at `lead`), what
    /// to show now: `None` while the answer may still be, or is, a call.
    pub fn push(&mut self, lead: Option<&Lead>, piece: &str) -> Option<String> {
        match lead {
            Some(Lead::Json | Lead::Undecided(_)) => {
                self.held.push_str(piece);
                None
            }
            _ => Some(std::mem::take(&mut self.held) + piece),
        }
    }

    /// What the call adds to the stream now: its name once written (the first delta), then
    /// its arguments' text as it comes, less a tail of whitespace and `}` that may be the
    /// call's own close. `None` when there is nothing new (or the answer is not a call).
    pub fn stream(&mut self, lead: Option<&Lead>) -> Option<CallDelta> {
        if lead != Some(&Lead::Json) {
            return None;
        }
        let mut name = None;
        if self.args_at.is_none() {
            let (n, at) = head(&self.held)?;
            (self.args_at, self.sent, name) = (Some(at), at, Some(n));
        }
        let end = self
            .held
            .trim_end_matches(|c: char| is_ws(c as u8) && c.is_ascii() || c == '}')
            .len()
            .max(self.sent);
        let arguments = self.held[self.sent..end].to_string();
        self.sent = end;
        (name.is_some() || !arguments.is_empty()).then_some(CallDelta { name, arguments })
    }

    /// At the answer's end: the call, a call cut short, or the text to show.
    pub fn finish(&mut self, lead: Option<&Lead>) -> CallEnd {
        let held = std::mem::take(&mut self.held);
        if lead != Some(&Lead::Json) {
            return CallEnd::Text(held);
        }
        let Some((name, at)) = head(&held) else {
            return CallEnd::Text(held);
        };
        let sent = self.args_at.map_or(at, |_| self.sent);
        let named = self.args_at.is_none().then(|| name.clone());
        match ToolCall::parse(&held) {
            Some(call) => {
                // The arguments end where the call's own `}` begins.
                let close = held.trim_end().len() - 1;
                let end = held[..close].trim_end().len().max(sent);
                let rest = CallDelta {
                    name: named,
                    arguments: held[sent..end].to_string(),
                };
                CallEnd::Called { call, rest }
            }
            None if self.args_at.is_some() => CallEnd::Cut(CallDelta {
                name: None,
                arguments: held[sent..].to_string(),
            }),
            None => CallEnd::Text(held),
        }
    }
}

impl ToolCall {
    /// The call in an answer the constraint held to `Schema::ToolCall` (whitespace and
    /// `<tool_call>` before it allowed), its arguments as the model wrote them; `None` when
    /// the answer ended before the call did (`max_tokens`).
    pub fn parse(answer: &str) -> Option<ToolCall> {
        let (name, at) = head(answer)?;
        let t = answer.trim_start();
        let t = t
            .strip_prefix(std::str::from_utf8(TOOL_CALL_TAG).expect("ASCII"))
            .unwrap_or(t);
        let v: Value = serde_json::from_str(t).ok()?;
        v.get("arguments")?.as_object()?;
        let close = answer.trim_end().len() - 1;
        Some(ToolCall {
            name,
            arguments: answer[at..close].trim_end().to_string(),
        })
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

    #[test]
    fn a_loose_schema_that_is_not_strict_holds_the_arguments_to_an_object_and_says_why() {
        let t = Tools::parse(
            Some(&json!([{"type": "function", "function": {"name": "f",
                "parameters": {"type": "object", "properties": {"n": {"type": "array", "uniqueItems": true}}}}}])),
            None,
        )
        .unwrap()
        .unwrap();
        let why = t.functions[0].loose.as_deref().unwrap();
        assert!(
            why.contains("tools[0].function.parameters.properties.n.uniqueItems"),
            "{why}"
        );
        assert_eq!(*t.functions[0].schema, Schema::AnyObject);
        assert!(accepts(&t, r#"{"name":"f","arguments":{"n":"anything"}}"#));
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
        assert!(deltas[1..].iter().all(|d| d.name.is_none()));
        let CallEnd::Called { call, rest } = h.finish(json) else {
            panic!("not a call")
        };
        assert_eq!(rest.name, None);
        let streamed: String = deltas
            .iter()
            .chain([&rest])
            .map(|d| d.arguments.as_str())
            .collect();
        assert_eq!(streamed, r#"{"zone": {"h": 2}}"#);
        assert_eq!(call.arguments, streamed);
        // Unstreamed (the CLI): the name and the whole arguments at the end.
        let mut h = HeldCall::default();
        for p in pieces {
            h.push(json, p);
        }
        let CallEnd::Called { rest, .. } = h.finish(json) else {
            panic!("not a call")
        };
        assert_eq!(rest.name.as_deref(), Some("get_time"));
        assert_eq!(rest.arguments, r#"{"zone": {"h": 2}}"#);
        // Cut after the name: the arguments so far; before it: text.
        let mut h = HeldCall::default();
        h.push(json, r#"{"name": "f", "arguments": {"a"#);
        let first = h.stream(json).unwrap();
        assert_eq!(
            (first.name.as_deref(), first.arguments.as_str()),
            (Some("f"), r#"{"a"#)
        );
        h.push(json, r#"": 1"#);
        assert_eq!(
            h.finish(json),
            CallEnd::Cut(CallDelta {
                name: None,
                arguments: r#"": 1"#.into()
            })
        );
        let mut h = HeldCall::default();
        h.push(json, r#"{"name": "f"#);
        assert_eq!(h.stream(json), None);
        assert_eq!(h.finish(json), CallEnd::Text(r#"{"name": "f"#.into()));
        // Text: shown with what was held before it.
        let mut h = HeldCall::default();
        assert_eq!(h.push(Some(&Lead::Undecided(vec![b' '])), " "), None);
        assert_eq!(h.push(Some(&Lead::Text), "Hi").as_deref(), Some(" Hi"));
    }
}
