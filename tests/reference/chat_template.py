#!/usr/bin/env python3
"""Renders chat templates the way Hugging Face transformers' apply_chat_template does, with
Python's jinja2: an ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and
loopcontrols, a raise_exception(msg) global and transformers' tojson filter
(json.dumps with ensure_ascii=False), rendered with messages, add_generation_prompt, tools (the case's, else None),
documents=None and the special tokens.

Reads a JSON list of cases {template, messages, bos_token, eos_token, tools?} on stdin; writes a JSON
list with, per case, {"text": ...}, {"raised": message} (the template called raise_exception)
or {"error": ...} (jinja2 failed otherwise).
"""
import json
import sys

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Raised(Exception):
    pass


def raise_exception(message):
    raise Raised(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def render(env, case):
    try:
        template = env.from_string(case["template"])
        text = template.render(messages=case["messages"], add_generation_prompt=True,
                               tools=case.get("tools"), documents=None, bos_token=case["bos_token"],
                               eos_token=case["eos_token"])
        return {"text": text}
    except Raised as e:
        return {"raised": str(e)}
    except jinja2.TemplateError as e:
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    env = environment()
    cases = json.load(sys.stdin)
    json.dump([render(env, c) for c in cases], sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
