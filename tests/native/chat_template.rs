//! Chat templates: the model's own Jinja template, rendered as Hugging Face renders it.
//! Checked against Python's `jinja2` run at test time (tests/reference/chat_template.py, the
//! environment `transformers`' `apply_chat_template` sets up) on real templates of several
//! model families, and against what the ChatML code this replaced rendered for the demo model.

use crate::common;

use common::{demo_model_path, python_has};
use flexquant::model::chat::{ChatTemplate, Message, SpecialTokens, TemplateSource, ToolPrompt};
use flexquant::model::gguf::Gguf;
use flexquant::model::tokenizer::Tokenizer;
use flexquant::Error;
use serde_json::{json, Value};

const TEMPLATES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/reference/chat_templates"
);

fn msg(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

/// What the ChatML code before minijinja rendered (a ChatML template's literal default system
/// prompt, inserted when the conversation has none), kept here as the yardstick.
fn chatml_as_before(default_system: &str, messages: &[Message]) -> String {
    let mut s = String::new();
    if messages.first().is_some_and(|m| m.role != "system") {
        s += &format!("<|im_start|>system\n{default_system}<|im_end|>\n");
    }
    for m in messages {
        s += &format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content);
    }
    s + "<|im_start|>assistant\n"
}

fn conversations() -> Vec<Vec<Message>> {
    vec![
        vec![msg("user", "Hi")],
        vec![msg("system", "You are terse."), msg("user", "Hi")],
        vec![
            msg("system", "  Be brief  "),
            msg("user", "What is 2+2?\nThink."),
            msg("assistant", "   4   "),
            msg(
                "user",
                "Ünïcödé 日本 🙂, \"quotes\", \\backslash, {{ braces }} and {% tags %}",
            ),
        ],
        vec![
            msg("user", "one"),
            msg("assistant", "two"),
            msg("user", "/stop three"),
            msg("assistant", "four"),
            msg("user", "five"),
        ],
        // Wrong role order: templates that check it raise.
        vec![msg("user", "a"), msg("user", "b")],
        vec![msg("assistant", "I go first"), msg("user", "b")],
    ]
}

#[test]
fn smollm2_template_renders_what_the_chatml_code_rendered() {
    let Some(path) = demo_model_path() else {
        return;
    };
    let g = Gguf::from_bytes("SmolLM2.gguf", std::fs::read(&path).unwrap()).unwrap();
    let t = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(t.chat.fallback_warning(), None, "the GGUF has a template");
    assert!(!t.chat.knows_tools());
    let system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    for conv in conversations() {
        assert_eq!(
            t.chat.render(&conv).unwrap(),
            chatml_as_before(system, &conv)
        );
    }
}

/// (file, bos_token, eos_token): the special tokens of the model each template comes from.
const CASES: [(&str, &str, &str); 6] = [
    ("llama-2-chat.jinja", "<s>", "</s>"),
    ("mixtral-instruct.jinja", "<s>", "</s>"),
    ("gemma-it.jinja", "<bos>", "<eos>"),
    ("zephyr-beta.jinja", "<s>", "</s>"),
    ("llama-3-instruct.jinja", "<|begin_of_text|>", "<|eot_id|>"),
    ("python-features.jinja", "<s>", "</s>"),
];

/// One render for the reference; a struct, so that each message's keys reach Python in the
/// order Rust gives them to the template (`role`, then `content`), as a JS app sends them.
#[derive(serde::Serialize)]
struct Case<'a> {
    file: &'a str,
    template: &'a str,
    messages: Vec<Message>,
    bos_token: &'a str,
    eos_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a Value>,
}

/// Every case rendered by tests/reference/chat_template.py.
fn python_renders(cases: &[Case]) -> Vec<Value> {
    common::python_json("chat_template.py", cases)
}

/// Our render in the reference's terms: `{"text"}`, `{"raised"}` or `{"error"}`.
fn our_render(t: &ChatTemplate, conv: &[Message]) -> Value {
    const RAISED: &str = "the chat template rejected the conversation: ";
    match t.render(conv) {
        Ok(text) => json!({ "text": text }),
        Err(Error::Input(m)) if m.starts_with(RAISED) => json!({ "raised": &m[RAISED.len()..] }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

#[test]
fn templates_render_byte_for_byte_as_python_jinja2_renders_them() {
    if !python_has("jinja2") {
        return;
    }
    let sources: Vec<String> = CASES
        .iter()
        .map(|(file, ..)| std::fs::read_to_string(format!("{TEMPLATES}/{file}")).unwrap())
        .collect();
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for ((file, bos, eos), jinja) in CASES.into_iter().zip(&sources) {
        let tokens = SpecialTokens {
            bos: bos.into(),
            eos: eos.into(),
        };
        let t = ChatTemplate::from_jinja(TemplateSource { file, jinja }, tokens).unwrap();
        for messages in conversations() {
            ours.push(our_render(&t, &messages));
            cases.push(Case {
                file,
                template: jinja,
                messages,
                bos_token: bos,
                eos_token: eos,
                tools: None,
            });
        }
    }
    let theirs = python_renders(&cases);
    assert_eq!(theirs.len(), cases.len());
    let (mut raised, mut texts) = (0, 0);
    for ((case, ours), theirs) in cases.iter().zip(&ours).zip(&theirs) {
        let what = format!("{} on {:?}", case.file, case.messages);
        assert!(
            theirs.get("error").is_none(),
            "jinja2 failed: {what}: {theirs}"
        );
        assert_eq!(ours, theirs, "{what}");
        raised += theirs.get("raised").is_some() as usize;
        texts += theirs.get("text").is_some() as usize;
    }
    // The comparison covers both outcomes, and special tokens made it into the text.
    assert!(
        raised >= 6 && texts >= 20,
        "raised {raised}, rendered {texts}"
    );
    assert!(ours.iter().any(|o| o["text"]
        .as_str()
        .is_some_and(|t| t.starts_with("<bos><start_of_turn>"))));
}

/// A conversation with function calls, in OpenAI's form (arguments as JSON text).
fn tool_conversations() -> Vec<Vec<Message>> {
    let call = |id: &str, city: &str| {
        json!({"id": id, "type": "function", "function": {"name": "get_weather",
            "arguments": format!("{{\"city\": \"{city}\"}}")}})
    };
    let assistant = |content: &str, calls: Vec<Value>| Message {
        tool_calls: Some(calls),
        ..msg("assistant", content)
    };
    let result = |id: &str, content: &str| Message {
        tool_call_id: Some(id.into()),
        ..msg("tool", content)
    };
    vec![
        vec![msg("user", "What is the weather in Paris?")],
        vec![
            msg("system", "Be brief."),
            msg("user", "Weather in Paris and Oslo?"),
            assistant("", vec![call("c1", "Paris"), call("c2", "Oslo")]),
            result("c1", "18 C, sunny"),
            result("c2", "9 C, rain"),
        ],
        vec![
            msg("user", "Is it sunny in Rome?"),
            assistant("Let me check.", vec![call("c1", "Rome")]),
            result("c1", "{\"sky\": \"clear\"}"),
            msg("assistant", "Yes, it is sunny."),
            msg("user", "Thanks! Ünïcödé 🙂"),
        ],
    ]
}

/// Function calling with a template that renders tools (Qwen 2.5's form, which most tool-using
/// families follow): the functions, calls and results reach it as `transformers` passes them
/// (calls' arguments as objects), and it renders them as jinja2 does. The templates of
/// `CASES` and the demo's do not render tools and are not taken to.
#[test]
fn tool_calls_render_as_python_jinja2_renders_them() {
    if !python_has("jinja2") {
        return;
    }
    let file = "qwen2.5-instruct-tools.jinja";
    let jinja = std::fs::read_to_string(format!("{TEMPLATES}/{file}")).unwrap();
    let tokens = SpecialTokens {
        bos: String::new(),
        eos: "<|im_end|>".into(),
    };
    let t = ChatTemplate::from_jinja(
        TemplateSource {
            file,
            jinja: &jinja,
        },
        tokens,
    )
    .unwrap();
    assert!(t.knows_tools());
    for (other, bos, eos) in CASES {
        let src = std::fs::read_to_string(format!("{TEMPLATES}/{other}")).unwrap();
        let tokens = SpecialTokens {
            bos: bos.into(),
            eos: eos.into(),
        };
        let o = ChatTemplate::from_jinja(
            TemplateSource {
                file: other,
                jinja: &src,
            },
            tokens,
        );
        assert!(!o.unwrap().knows_tools(), "{other}");
    }
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}}}]);
    let prompt = ToolPrompt {
        list: &tools,
        instructions: "(for templates that do not know tools)",
    };
    let (mut cases, mut ours) = (Vec::new(), Vec::new());
    for conv in tool_conversations() {
        let text = t.render_with_tools(&conv, Some(prompt)).unwrap();
        assert!(!text.contains(prompt.instructions));
        ours.push(json!({ "text": text }));
        // What transformers is handed: arguments as objects.
        let mut theirs = conv.clone();
        for c in theirs
            .iter_mut()
            .flat_map(|m| m.tool_calls.iter_mut().flatten())
        {
            let args: Value =
                serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            c["function"]["arguments"] = args;
        }
        cases.push(Case {
            file,
            template: &jinja,
            messages: theirs,
            bos_token: "",
            eos_token: "<|im_end|>",
            tools: Some(&tools),
        });
    }
    let theirs = python_renders(&cases);
    for ((case, ours), theirs) in cases.iter().zip(&ours).zip(&theirs) {
        assert_eq!(ours, theirs, "{:?}", case.messages);
    }
    let two_calls = ours[1]["text"].as_str().unwrap();
    assert!(
        two_calls.contains(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}"
        ) && two_calls.contains("<tool_response>\n9 C, rain\n</tool_response>"),
        "{two_calls}"
    );
}

fn write_tiny_with(config: Option<&str>) -> tempfile::TempDir {
    let d = common::tiny_model_dir();
    let p = d.path().join("tokenizer_config.json");
    match config {
        Some(c) => std::fs::write(&p, c).unwrap(),
        None => std::fs::remove_file(&p).unwrap(),
    }
    d
}

#[test]
fn hugging_face_directories_use_tokenizer_config_json() {
    // The tiny model's own config: a ChatML template.
    let d = common::tiny_model_dir();
    let m = flexquant::model::load::load(d.path()).unwrap();
    assert_eq!(m.tokenizer.chat.fallback_warning(), None);
    assert_eq!(
        m.tokenizer.chat.render(&[msg("user", "hi")]).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );

    // A named list: "default" is the chat template; the special tokens come from the config.
    let d = write_tiny_with(Some(
        r#"{"chat_template": [{"name": "tool_use", "template": "T"},
            {"name": "default", "template": "{{ bos_token }}|{{ messages[0].content }}|{{ eos_token }}"}],
            "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}"#,
    ));
    let m = flexquant::model::load::load(d.path()).unwrap();
    assert_eq!(
        m.tokenizer.chat.render(&[msg("user", "hi")]).unwrap(),
        "<|im_start|>|hi|<|im_end|>"
    );

    // No template: ChatML, and a warning to show.
    let d = write_tiny_with(None);
    let m = flexquant::model::load::load(d.path()).unwrap();
    assert!(m
        .tokenizer
        .chat
        .fallback_warning()
        .unwrap()
        .contains("ChatML"));

    // A template that does not compile: a load error naming the file and the Jinja error.
    let d = write_tiny_with(Some(r#"{"chat_template": "{% if messages %}unclosed"}"#));
    let e = flexquant::model::load::load(d.path())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer_config.json: the chat template does not compile: syntax error"),
        "{e}"
    );
}
