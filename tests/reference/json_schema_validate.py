#!/usr/bin/env python3
"""Validates JSON texts against a JSON Schema with Python's `jsonschema` (Draft 2020-12), the
independent check of what flexquant's structured-output automaton lets a model write.

Formats are asserted, not only annotated: `date`, `date-time`, `time`, `uuid`, `ipv4`, `ipv6`,
`email`, `hostname`, `duration` and `uri` are checked by jsonschema's format checker
(`date-time` and `time` through the `rfc3339-validator` package, `hostname` through `fqdn`,
`duration` through `isoduration`, `uri` through `rfc3986-validator`, which must be installed: a
format left unchecked would pass anything).

Reads a JSON list of cases {schema, texts: [...]} on stdin; writes a JSON list with, per case,
a list of null (the text parses and is valid) or the first error's message.
"""
import json
import sys

import jsonschema
import fqdn  # noqa: F401 (without it, jsonschema checks no `hostname`)
import rfc3339_validator  # noqa: F401 (without it, jsonschema checks no `date-time`)
import isoduration  # noqa: F401 (without it, jsonschema checks no `duration`)
import rfc3986_validator  # noqa: F401 (without it, jsonschema checks no `uri`)

VALIDATOR = jsonschema.Draft202012Validator
CHECKED = {"date", "date-time", "time", "uuid", "ipv4", "ipv6", "email", "hostname", "duration",
           "uri"}
assert CHECKED <= set(VALIDATOR.FORMAT_CHECKER.checkers), "a format would go unchecked"


def check(schema, text):
    try:
        instance = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e}"
    validator = VALIDATOR(schema, format_checker=VALIDATOR.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(instance), key=str)
    return errors[0].message if errors else None


def main():
    cases = json.load(sys.stdin)
    json.dump([[check(c["schema"], t) for t in c["texts"]] for c in cases], sys.stdout)


if __name__ == "__main__":
    main()
