//! A turn's JSON constraint (`JsonConstraint`): the automaton of `json_mode` over the tokens
//! the model draws, for JSON mode, structured output and function calls. It decides whether
//! an answer that may be a call is one (`Lead`), keeps the candidates to those that continue the
//! JSON, and after a whole call lets another follow (parallel calls) or the answer end.

use crate::error::{Error, Result};
use crate::runtime::json_mode::{JsonPrefix, Schema};
use std::sync::Arc;

/// The bytes each token stands for (`None`: a special token, never part of JSON), by id.
pub type TokenBytes = Vec<Option<Vec<u8>>>;

/// The JSON punctuation, digits and literal letters whose one-byte tokens are watched.
pub const WATCHED_BYTES: &[u8] = b"{}[]:,\"-+.0123456789eEtrufalsn \n";

/// What opens a function call written in the Hermes / Qwen style (`<tool_call>{...}`): an
/// answer that may be a call (`JsonConstraint::optional`) is one if it starts with this or with
/// `{"name"`.
pub const TOOL_CALL_TAG: &[u8] = b"<tool_call>";
/// What may close a call opened with `TOOL_CALL_TAG`, before the next call or the end.
pub const TOOL_CALL_END: &[u8] = b"</tool_call>";
/// Most bytes between two calls (whitespace and `TOOL_CALL_END`): past them only the end of
/// the answer or a call's opening is let through.
const MAX_BETWEEN_CALLS: usize = 32;

/// Whether the answer is the JSON (`JsonConstraint::optional` decides it at its first bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lead {
    /// The answer is the JSON: JSON mode, a required call, or an optional call begun.
    Json,
    /// Only whitespace or part of `TOOL_CALL_TAG` so far (these bytes).
    Undecided(Vec<u8>),
    /// Not a call: the `response_format` JSON that stands instead of free text
    /// (`JsonConstraint::or_answer`).
    Answer,
    /// A call is whole and another may follow (`JsonConstraint::calls`): these bytes since,
    /// whitespace, `TOOL_CALL_END` or the opening of the next call so far. The answer may end.
    Between(Vec<u8>),
    /// Free text: nothing is constrained.
    Text,
}

/// A turn's JSON constraint: the automaton over the answer so far and the token table.
#[derive(Debug, Clone)]
pub struct JsonConstraint {
    state: JsonPrefix,
    lead: Lead,
    bytes: Arc<TokenBytes>,
    /// Bytes whose one-byte tokens are watched: `WATCHED_BYTES` and the schema's strings'.
    watched_bytes: Vec<u8>,
    /// What the request asked for, for errors: "response_format (JSON mode)" or "tool call".
    what: &'static str,
    /// With an optional call (`optional` of a tagged schema): the tag's name. An answer that
    /// opens `{` is a call only once it goes on with `"NAME"`; other JSON is text.
    tag: Option<Vec<u8>>,
    /// What each JSON follows (the automaton starts over with it for a next call).
    schema: Arc<Schema>,
    /// How many more calls may follow the one being written (`calls`).
    more: usize,
    /// What an answer that is not a call must be instead of free text (`or_answer`).
    answer: Option<Arc<Schema>>,
}

/// How the text before a call's JSON stands (`JsonConstraint::opening`).
enum Opening<'a> {
    /// The JSON has begun: these bytes of it.
    Json(&'a [u8]),
    /// Whitespace, or a prefix of an opening: nothing decided.
    Pending,
    /// Something else.
    Not,
}

/// The bytes whose one-byte tokens are watched for `schemas`: JSON's own first, then the
/// schemas' names and values, each once, at most 128 (`generate::MAX_WATCHED`).
fn watched_bytes(schemas: &[&Schema]) -> Vec<u8> {
    let mut out = WATCHED_BYTES.to_vec();
    for s in schemas {
        crate::runtime::json_schema::string_bytes(s, &mut out);
    }
    let mut seen = [false; 256];
    out.retain(|&b| !std::mem::replace(&mut seen[b as usize], true));
    out.truncate(128);
    out
}

impl JsonConstraint {
    /// JSON mode over `bytes` (`Tokenizer::token_bytes`), the answer an object that follows
    /// `schema` (`Schema::AnyObject`: any object).
    pub fn new(bytes: Arc<TokenBytes>, schema: Arc<Schema>) -> Self {
        let what = match *schema {
            Schema::ToolCall(_) => "tool call",
            _ => "response_format (JSON mode)",
        };
        JsonConstraint {
            state: JsonPrefix::new(schema.clone()),
            lead: Lead::Json,
            bytes,
            watched_bytes: watched_bytes(&[&schema]),
            what,
            tag: None,
            schema,
            more: 0,
            answer: None,
        }
    }

    /// With an optional call (`tool_choice: 'auto'` beside a `response_format` schema): an
    /// answer that does not open as a call is JSON that follows `answer`, not free text.
    /// An object that opens `{"name"` is the call (the tag decides first).
    pub fn or_answer(mut self, answer: Arc<Schema>) -> Self {
        debug_assert!(matches!(self.lead, Lead::Undecided(_)));
        self.watched_bytes = watched_bytes(&[&self.schema, &answer]);
        self.answer = Some(answer);
        self
    }

    /// Lets the answer be up to `max` calls (OpenAI's parallel function calls), one after the
    /// other, apart by whitespace (and `TOOL_CALL_END` where written); after each whole call
    /// the answer may end (`Lead::Between`). Only for a call schema; `max` is at least 1.
    pub fn calls(mut self, max: usize) -> Self {
        debug_assert!(matches!(*self.schema, Schema::ToolCall(_)));
        self.more = max.max(1) - 1;
        self
    }

    /// An answer that is either free text or, if it starts with `{` or `TOOL_CALL_TAG` (after
    /// whitespace), JSON that follows `schema` (`tool_choice: 'auto'`). For a call (a tagged
    /// schema), `{` must go on with its tag's name (`{"name"`): an answer that writes other
    /// JSON (a model asked for JSON data) stays text.
    pub fn optional(bytes: Arc<TokenBytes>, schema: Arc<Schema>) -> Self {
        let tag = match &*schema {
            Schema::ToolCall(t) | Schema::Tagged(t) => Some(t.key.clone()),
            _ => None,
        };
        JsonConstraint {
            lead: Lead::Undecided(Vec::new()),
            tag,
            ..Self::new(bytes, schema)
        }
    }

    /// Whether the answer is the JSON, free text, or not known yet.
    pub fn lead(&self) -> &Lead {
        &self.lead
    }

    /// The one-byte tokens of the watched bytes (`Backend::watch`), so that some valid
    /// continuation is always among the candidates (at most 128: printable ASCII and more).
    pub fn watched(&self) -> Vec<u32> {
        // Each byte's first one-byte token, in one pass over the vocabulary.
        let mut token_of = [None; 256];
        for (id, t) in self.bytes.iter().enumerate() {
            if let Some(&[b]) = t.as_deref() {
                token_of[b as usize].get_or_insert(id as u32);
            }
        }
        self.watched_bytes
            .iter()
            .filter_map(|&b| token_of[b as usize])
            .collect()
    }

    fn bytes_of(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }

    /// Whether `t` (after whitespace) opens the JSON: with `TOOL_CALL_TAG`, or with `{` (for
    /// a tagged schema, `{` then whitespace and `"TAG"`).
    fn opening<'a>(&self, t: &'a [u8]) -> Opening<'a> {
        let t = t.trim_ascii_start();
        if let Some(rest) = t.strip_prefix(TOOL_CALL_TAG) {
            return Opening::Json(rest);
        }
        if !t.starts_with(b"{") {
            return match TOOL_CALL_TAG.starts_with(t) {
                true => Opening::Pending,
                false => Opening::Not,
            };
        }
        let Some(tag) = &self.tag else {
            return Opening::Json(t);
        };
        let r = t[1..].trim_ascii_start();
        let want = [&b"\""[..], tag, b"\""].concat();
        if r.starts_with(&want) {
            Opening::Json(t)
        } else if want.starts_with(r) && JsonPrefix::new(self.schema.clone()).feed(t) {
            Opening::Pending
        } else {
            Opening::Not
        }
    }

    /// What an undecided answer becomes with `held` as its text: `None` if refused (it opens
    /// JSON that cannot go on), else the lead and, for JSON, the automaton after it.
    fn decide(&self, held: &[u8]) -> Option<(Lead, Option<JsonPrefix>)> {
        match self.opening(held) {
            Opening::Json(j) => self.state.after(j).map(|p| (Lead::Json, Some(p))),
            Opening::Pending => Some((Lead::Undecided(held.to_vec()), None)),
            Opening::Not => match &self.answer {
                None => Some((Lead::Text, None)),
                Some(a) => JsonPrefix::new(a.clone())
                    .after(held)
                    .map(|p| (Lead::Answer, Some(p))),
            },
        }
    }

    /// What the text after a whole call becomes with `held` as its text: `None` if refused
    /// (anything but whitespace, `TOOL_CALL_END` and the next call's opening).
    fn decide_between(&self, held: &[u8]) -> Option<(Lead, Option<JsonPrefix>)> {
        let t = held.trim_ascii_start();
        let t = match t.strip_prefix(TOOL_CALL_END) {
            Some(rest) => rest,
            None if TOOL_CALL_END.starts_with(t) => b"",
            None => t,
        };
        match self.opening(t) {
            Opening::Json(j) => JsonPrefix::new(self.schema.clone())
                .after(j)
                .map(|p| (Lead::Json, Some(p))),
            Opening::Pending if held.len() <= MAX_BETWEEN_CALLS => {
                Some((Lead::Between(held.to_vec()), None))
            }
            _ => None,
        }
    }

    /// The candidates (best first) whose bytes keep the answer a JSON prefix, in order (every
    /// candidate while the answer is free text). None left is an error naming the state
    /// (`tokens`: the sequence length, for the message).
    pub fn allowed(&self, cand: &[(u32, f32)], tokens: usize) -> Result<Vec<(u32, f32)>> {
        let out: Vec<(u32, f32)> = cand
            .iter()
            .copied()
            .filter(|&(id, _)| self.takes(id))
            .collect();
        if out.is_empty() {
            return Err(Error::input(format!(
                "{}: none of the {} candidate tokens continues the JSON at position {tokens}",
                self.what,
                cand.len()
            )));
        }
        Ok(out)
    }

    /// Whether token `id` may come next.
    pub fn takes(&self, id: u32) -> bool {
        match (&self.lead, self.bytes_of(id)) {
            (Lead::Text, _) => true,
            // A special token (end of turn) ends an answer that is not JSON, or after a call.
            (Lead::Undecided(_), None) => self.answer.is_none(),
            (Lead::Between(_), None) => true,
            (Lead::Undecided(held), Some(b)) => self.decide(&[held, b].concat()).is_some(),
            (Lead::Between(held), Some(b)) => self.decide_between(&[held, b].concat()).is_some(),
            (Lead::Json | Lead::Answer, b) => {
                b.is_some_and(|b| !b.is_empty() && self.state.after(b).is_some())
            }
        }
    }

    /// Whether a call is whole, another may follow (`Lead::Between`) and none has begun to
    /// open (only whitespace since, and perhaps a whole `TOOL_CALL_END`): then the model's own
    /// choice decides whether the answer goes on (`takes`) or ends.
    pub fn between_calls(&self) -> bool {
        let Lead::Between(held) = &self.lead else {
            return false;
        };
        let t = held.trim_ascii_start();
        t.strip_prefix(TOOL_CALL_END)
            .unwrap_or(t)
            .trim_ascii()
            .is_empty()
    }

    /// Reads token `id` (one `allowed` returned); whether the answer is now complete: its
    /// JSON whole and no further call may follow.
    pub fn advance(&mut self, id: u32) -> bool {
        let bytes = self.bytes.get(id as usize).cloned().flatten();
        let decided = match &self.lead {
            Lead::Text => return false,
            Lead::Undecided(held) => {
                self.decide(&[held.as_slice(), bytes.as_deref().unwrap_or_default()].concat())
            }
            Lead::Between(held) => self
                .decide_between(&[held.as_slice(), bytes.as_deref().unwrap_or_default()].concat()),
            Lead::Json | Lead::Answer => {
                let ok = bytes.is_some_and(|b| self.state.feed(&b));
                debug_assert!(ok, "token {id} was not allowed");
                None
            }
        };
        if let Some((lead, state)) = decided {
            self.lead = lead;
            if let Some(s) = state {
                self.state = s;
            }
        }
        if self.lead == Lead::Answer {
            return self.state.is_complete();
        }
        if self.lead != Lead::Json || !self.state.is_complete() {
            return false;
        }
        if self.more == 0 {
            return true;
        }
        self.more -= 1;
        self.lead = Lead::Between(Vec::new());
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::json_tagged::Tagged;

    fn call(fns: &[(Vec<u8>, Arc<Schema>)]) -> Arc<Tagged> {
        Arc::new(Tagged::call(&fns.iter().cloned().collect()))
    }

    #[test]
    fn the_constraint_filters_candidates_and_ends_with_the_object() {
        let table: TokenBytes = vec![
            Some(b"{".to_vec()),
            Some(b"\"a\":".to_vec()),
            Some(b"1}".to_vec()),
            Some(b"hello".to_vec()),
            None,
            Some(b"}".to_vec()),
        ];
        let mut c = JsonConstraint::new(Arc::new(table), Arc::new(Schema::AnyObject));
        assert_eq!(c.watched(), vec![0, 5]);
        let all: Vec<(u32, f32)> = (0..6).map(|i| (i, 1.0)).collect();
        assert_eq!(c.allowed(&all, 0).unwrap(), vec![(0, 1.0)]);
        assert!(!c.advance(0));
        assert_eq!(c.allowed(&all, 1).unwrap(), vec![(1, 1.0), (5, 1.0)]);
        assert!(!c.advance(1));
        assert_eq!(c.allowed(&all, 2).unwrap(), vec![(0, 1.0), (2, 1.0)]);
        assert!(c.advance(2));
        let e = c.allowed(&all, 3).unwrap_err().to_string();
        assert!(e.contains("JSON mode") && e.contains("position 3"), "{e}");
    }

    #[test]
    fn an_optional_call_is_json_if_it_opens_as_one_and_free_text_otherwise() {
        let table: TokenBytes = vec![
            Some(b" ".to_vec()),
            Some(b"{".to_vec()),
            Some(b"<tool".to_vec()),
            Some(b"_call>".to_vec()),
            Some(b"Hello".to_vec()),
            None,
            Some(b"}".to_vec()),
            Some(b"{]".to_vec()),
            Some(b"<b>".to_vec()),
        ];
        let table = Arc::new(table);
        let all: Vec<(u32, f32)> = (0..9).map(|i| (i, 1.0)).collect();
        let ids = |v: Vec<(u32, f32)>| v.into_iter().map(|c| c.0).collect::<Vec<_>>();
        let fresh = || JsonConstraint::optional(table.clone(), Arc::new(Schema::AnyObject));

        // Undecided: anything but JSON that breaks at once; the end-of-turn token too.
        let mut c = fresh();
        assert_eq!(
            ids(c.allowed(&all, 0).unwrap()),
            vec![0, 1, 2, 3, 4, 5, 6, 8]
        );
        assert!(!c.advance(0));
        assert_eq!(c.lead(), &Lead::Undecided(b" ".to_vec()));
        assert!(!c.advance(1));
        assert_eq!(c.lead(), &Lead::Json);
        assert_eq!(ids(c.allowed(&all, 2).unwrap()), vec![0, 6]);
        assert!(c.advance(6), "the object closed");

        // The tag, split over two tokens, then the JSON.
        let mut c = fresh();
        c.advance(2);
        assert_eq!(c.lead(), &Lead::Undecided(b"<tool".to_vec()));
        assert_eq!(
            c.allowed(&all, 1).unwrap(),
            all,
            "text or the tag may follow"
        );
        c.advance(3);
        assert_eq!(c.lead(), &Lead::Json);
        assert_eq!(ids(c.allowed(&all, 2).unwrap()), vec![0, 1]);

        // Text: everything goes from then on.
        let mut c = fresh();
        c.advance(8);
        assert_eq!(c.lead(), &Lead::Text);
        assert_eq!(c.allowed(&all, 1).unwrap(), all);
        assert!(!c.advance(7));
        let mut c = fresh();
        c.advance(4);
        assert_eq!(c.lead(), &Lead::Text);
    }

    /// `auto` with tools: `{` is a call only once `"name"` follows it; other JSON is text (a
    /// model asked for JSON data while tools are offered answers with it, not with a call).
    #[test]
    fn an_optional_call_opens_with_its_tag_and_other_json_is_text() {
        let table: TokenBytes = [&b"{"[..], b" \"na", b"me\"", b"\"x\"", b"}", b"<tool_call>"]
            .iter()
            .map(|b| Some(b.to_vec()))
            .collect();
        let table = Arc::new(table);
        let f = vec![(b"f".to_vec(), Arc::new(Schema::AnyObject))];
        let fresh =
            || JsonConstraint::optional(table.clone(), Arc::new(Schema::ToolCall(call(&f))));
        let lead_after = |ids: &[u32]| {
            let mut c = fresh();
            ids.iter().for_each(|&i| {
                c.advance(i);
            });
            c.lead().clone()
        };
        assert_eq!(lead_after(&[0]), Lead::Undecided(b"{".to_vec()));
        assert_eq!(lead_after(&[0, 1]), Lead::Undecided(b"{ \"na".to_vec()));
        assert_eq!(lead_after(&[0, 1, 2]), Lead::Json);
        assert_eq!(lead_after(&[0, 3]), Lead::Text);
        assert_eq!(lead_after(&[0, 4]), Lead::Text, "{{}} is JSON, not a call");
        // The tag commits at once.
        assert_eq!(lead_after(&[5]), Lead::Json);
        // JSON mode's optional object (no tag) still decides at `{`.
        let mut c = JsonConstraint::optional(table.clone(), Arc::new(Schema::AnyObject));
        c.advance(0);
        assert_eq!(c.lead(), &Lead::Json);
    }
}
