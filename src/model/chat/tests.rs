use super::*;

fn tokens() -> SpecialTokens {
    SpecialTokens {
        bos: "<s>".into(),
        eos: "</s>".into(),
    }
}

fn model(jinja: &str) -> ChatTemplate {
    ChatTemplate::from_jinja(
        TemplateSource {
            file: "test.gguf",
            jinja,
        },
        tokens(),
    )
    .unwrap()
}

fn user(s: &str) -> Message {
    Message::new("user", s)
}

#[test]
fn fallback_is_chatml_and_says_so() {
    let t = ChatTemplate::new(None, tokens()).unwrap();
    assert!(t.fallback_warning().unwrap().contains("ChatML"));
    assert_eq!(t.source(), None);
    let p = t
        .render(&[Message::new("system", "S"), user("hi")])
        .unwrap();
    assert_eq!(
        p,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn fallback_default_system_opens_a_conversation_without_one() {
    let t = ChatTemplate::chatml_fallback(Some("You are X"), tokens());
    let p = t.render(&[user("hi")]).unwrap();
    assert_eq!(
        p,
        "<|im_start|>system\nYou are X<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    let p = t
        .render(&[Message::new("system", "S"), user("hi")])
        .unwrap();
    assert!(p.starts_with("<|im_start|>system\nS<|im_end|>\n<|im_start|>user"));
}

#[test]
fn a_model_template_is_rendered_not_guessed() {
    let t = model("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}");
    assert_eq!(t.fallback_warning(), None);
    assert_eq!(
        t.render(&[user("hi")]).unwrap(),
        "<s>[user] hi</s>[assistant]"
    );
}

#[test]
fn raise_exception_is_an_input_error_quoting_the_template() {
    let t = model("{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with the user') }}{% endif %}ok");
    assert_eq!(t.render(&[user("hi")]).unwrap(), "ok");
    let e = t.render(&[Message::new("assistant", "a")]).unwrap_err();
    assert!(matches!(e, Error::Input(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "the chat template rejected the conversation: Conversation must start with the user"
    );
}

#[test]
fn a_template_that_does_not_compile_names_the_file_and_the_error() {
    let e = ChatTemplate::from_jinja(
        TemplateSource {
            file: "model.gguf",
            jinja: "{% for m in messages %}{{ m.content }}",
        },
        tokens(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Format { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("model.gguf: the chat template does not compile"),
        "{msg}"
    );
    assert!(msg.contains("syntax error"), "{msg}");
}

#[test]
fn python_methods_loop_controls_and_whitespace_control_work() {
    let t = model(
        "{% for m in messages %}\n  {% if m.content.startswith('skip') %}{% continue %}{% endif %}\n{{ m.content.strip().upper() }}|\n{% endfor %}",
    );
    let p = t
        .render(&[user("  a "), user("skip me"), user("b")])
        .unwrap();
    assert_eq!(p, "A|\nB|\n");
}

#[test]
fn tojson_writes_what_pythons_json_dumps_writes() {
    let t = model("{{ messages | tojson }}/{{ {'n': 1, 'f': 0.5, 'ok': true, 'x': none} | tojson }}/{{ [] | tojson(indent=2) }}/{{ messages | tojson(indent=2) }}");
    let p = t.render(&[user("é \"q\" <b>\n")]).unwrap();
    assert_eq!(
        p,
        "[{\"role\": \"user\", \"content\": \"é \\\"q\\\" <b>\\n\"}]/{\"n\": 1, \"f\": 0.5, \"ok\": true, \"x\": null}/[]/[\n  {\n    \"role\": \"user\",\n    \"content\": \"é \\\"q\\\" <b>\\n\"\n  }\n]"
    );
}

#[test]
fn a_template_without_tools_gets_calls_as_json_and_results_as_user_messages() {
    let t = ChatTemplate::new(None, tokens()).unwrap();
    assert!(!t.knows_tools());
    let call = |id: &str, city: &str| {
        serde_json::json!({"id": id, "type": "function", "function": {"name": "get_weather",
            "arguments": format!("{{\"city\": \"{city}\"}}")}})
    };
    let conv = [
        Message::new("system", "Be brief."),
        user("Paris and Oslo?"),
        Message {
            tool_calls: Some(vec![call("a", "Paris"), call("b", "Oslo")]),
            ..Message::new("assistant", "")
        },
        Message {
            tool_call_id: Some("a".into()),
            ..Message::new("tool", "18 C")
        },
        Message {
            tool_call_id: Some("b".into()),
            ..Message::new("tool", "9 C")
        },
    ];
    let prompt = ToolPrompt {
        list: &serde_json::json!([]),
        instructions: "TOOLS",
    };
    assert_eq!(
        t.render_with_tools(&conv, Some(prompt)).unwrap(),
        "<|im_start|>system\nBe brief.\n\nTOOLS<|im_end|>\n\
         <|im_start|>user\nParis and Oslo?<|im_end|>\n\
         <|im_start|>assistant\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n\
         {\"name\": \"get_weather\", \"arguments\": {\"city\":\"Oslo\"}}<|im_end|>\n\
         <|im_start|>user\nResult of get_weather: 18 C\nResult of get_weather: 9 C<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // No system message: the instructions are one; no tools offered: none, calls still written.
    let p = t.render_with_tools(&conv[1..], Some(prompt)).unwrap();
    assert!(p.starts_with("<|im_start|>system\nTOOLS<|im_end|>\n<|im_start|>user\nParis"));
    let p = t.render_with_tools(&conv[1..], None).unwrap();
    assert!(p.starts_with("<|im_start|>user\nParis") && p.contains("Result of get_weather: 9 C"));
    // A null content (an assistant's call, as OpenAI sends it) reads as empty.
    let m: Message =
        serde_json::from_str(r#"{"role":"assistant","content":null,"tool_calls":[]}"#).unwrap();
    assert_eq!(m.content, "");
}
