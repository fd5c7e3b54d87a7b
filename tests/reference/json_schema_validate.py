#!/usr/bin/env python3
"""Validates JSON texts against a JSON Schema with Python's `jsonschema` (Draft 2020-12), the
independent check of what flexquant's structured-output automaton lets a model write.

Reads a JSON list of cases {schema, texts: [...]} on stdin; writes a JSON list with, per case,
a list of null (the text parses and is valid) or the first error's message.
"""
import json
import sys

import jsonschema


def check(schema, text):
    try:
        instance = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(instance), key=str)
    return errors[0].message if errors else None


def main():
    cases = json.load(sys.stdin)
    json.dump([[check(c["schema"], t) for t in c["texts"]] for c in cases], sys.stdout)


if __name__ == "__main__":
    main()
