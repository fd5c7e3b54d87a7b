#!/usr/bin/env python3
"""Static test server for the browser tests (tests/web.rs, tests/npm): a plain static host
(no Range support, CORS for the test page's origin) with a few deliberately broken views of one
ensemble, selected by a path prefix:

  /tiny/...            the ensemble as built
  /corrupt/tiny/...    the shard that trajectory step 1 swaps in has one byte flipped
  /truncated/tiny/...  that shard cut to half its length
  /long/tiny/...       that shard sent with as many bytes again after it (longer than declared)
  /missing/tiny/...    that shard answered 404 (a deploy that lost a file)
  /v99/tiny/...        the manifest claims format version 99
  /garbage/tiny/...    the manifest is not JSON
  /net/tiny/...        module shards are cut mid-body (connection closed) while /__fail?on=1
  /badbase/tiny/...    the base shard has one byte flipped
  /badtok/tiny/...     the tokenizer file has one byte flipped
  /chatml/tiny/...     the manifest declares no chat template (the runtime falls back to ChatML)
  /strict/tiny/...     the manifest's template raises unless roles alternate user/assistant
  /stale/tiny/...      while /__stale?on=1, the step-1 shard has a byte flipped and every file is
                       sent cacheable for an hour (a redeploy behind the browser's HTTP cache)
  /<mount>/...         a directory given with --mount NAME=DIR (e.g. the npm test page)
  /corrupt/packed/...  the mount named `packed` (the tiny ensemble packed), with one byte
                       flipped in the same module version as /corrupt/tiny/, inside its pack

  /__count?prefix=P    requests so far whose path starts with P (JSON number)
  /__reset             forget the counts
  /__fail?on=1|0       switch the /net/ failure on or off; &times=K: only the next K responses;
                       &mode=cut (default: half the body, then the connection closed) | stall
                       (half the body, then nothing for STALL_S) | hang (no answer for STALL_S)
  /__stale?on=1|0      switch the /stale/ view's old deployment on or off
  /__report?name=N&json=J  a test's figures: written to REPORT_DIR/N.json when --report is given
  /__delay?ms=N        add N ms before every response but the control paths and the npm mount
                       (a far-away static host: the parallel-download benchmark)
  /__blob?bytes=N      N bytes as one file (the single-file download the benchmark compares to)

Usage: server.py ENSEMBLE_DIR [--port 0] [--mount NAME=DIR ...] [--isolated] [--report DIR];
prints the URL on
stdout. --isolated sends COOP/COEP on every response (cross-origin isolation: what wasm threads
need, e.g. the wllama benchmark's 2-thread run).
"""
import http.server, json, os, sys, threading, time, urllib.parse
from collections import Counter

ens = os.path.abspath(sys.argv[1])
args = sys.argv[2:]
port, mounts, isolated, report = 0, {}, False, None
while args:
    a = args.pop(0)
    if a == "--isolated":
        isolated = True
    elif a == "--report":
        report = os.path.abspath(args.pop(0))
    elif a == "--port":
        port = int(args.pop(0))
    elif a == "--mount":
        name, d = args.pop(0).split("=", 1)
        mounts[name] = os.path.abspath(d)

manifest = json.load(open(os.path.join(ens, "manifest.json")))
sw = manifest["trajectory"][1]["swap"]
victim = next(v["file"] for v in manifest["modules"]
              if v["layer"] == sw["layer"] and v["kind"] == sw["kind"] and v["bits"] == sw["to_bits"])
counts, lock, state = Counter(), threading.Lock(), {"fail": False, "delay_ms": 0, "stale": False, "mode": "cut"}
# How long a stalled or hung response keeps its connection open without sending a byte.
STALL_S = 60
VIEWS = ("corrupt", "truncated", "long", "missing", "v99", "garbage", "net", "badbase", "badtok", "chatml", "strict",
         "stale")
STRICT = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A client that goes away mid-response (a terminated worker, a cancelled fetch) is
        # normal here; anything else is printed.
        if not isinstance(sys.exc_info()[1], (ConnectionError, BrokenPipeError)):
            super().handle_error(request, client_address)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send(self, code, body, ctype="application/octet-stream", cut=False, cacheable=False):
        if cut == "hang":
            time.sleep(STALL_S)
            self.close_connection = True
            return
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        # Cacheable (no validators): what a CDN sends; the HTTP cache may then answer alone.
        self.send_header("Cache-Control", "public, max-age=3600" if cacheable else "no-store")
        if isolated:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        if cut:
            self.send_header("Connection", "close")
        self.end_headers()
        if cut:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if cut == "stall":
                time.sleep(STALL_S)
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_GET(self):
        u = urllib.parse.urlparse(self.path)
        path, q = urllib.parse.unquote(u.path), urllib.parse.parse_qs(u.query)
        with lock:
            counts[path] += 1
        if path == "/__count":
            p = q.get("prefix", [""])[0]
            with lock:
                n = sum(c for k, c in counts.items() if k.startswith(p))
            return self.send(200, str(n).encode(), "application/json")
        if path == "/__reset":
            with lock:
                counts.clear()
            return self.send(200, b"0", "application/json")
        if path == "/__delay":
            state["delay_ms"] = int(q.get("ms", ["0"])[0])
            return self.send(200, str(state["delay_ms"]).encode(), "application/json")
        parts = path.lstrip("/").split("/", 1)
        if state["delay_ms"] and parts[0] != "npm" and path not in ("/__count", "/__reset", "/__fail"):
            time.sleep(state["delay_ms"] / 1000)
        if path == "/__blob":
            return self.send(200, bytes(int(q.get("bytes", ["0"])[0])))
        if path == "/__report":
            name = q.get("name", [""])[0]
            if report and name.replace("-", "").isalnum():
                os.makedirs(report, exist_ok=True)
                with open(os.path.join(report, name + ".json"), "w") as f:
                    f.write(json.dumps(json.loads(q.get("json", ["{}"])[0]), indent=1))
            return self.send(200, b"1" if report else b"0", "application/json")
        if path == "/__stale":
            state["stale"] = q.get("on", ["0"])[0] == "1"
            return self.send(200, b"1" if state["stale"] else b"0", "application/json")
        if path == "/__fail":
            state["fail"] = q.get("on", ["0"])[0] == "1"
            state["fail_left"] = int(q.get("times", ["-1"])[0])
            state["mode"] = q.get("mode", ["cut"])[0]
            return self.send(200, b"1" if state["fail"] else b"0", "application/json")
        if parts[0] in mounts:
            return self.file(mounts[parts[0]], parts[1] if len(parts) > 1 else "index.html")
        view = ""
        if parts[0] in VIEWS:
            view, path = parts[0], "/" + (parts[1] if len(parts) > 1 else "")
        if view == "corrupt" and path.startswith("/packed/") and "packed" in mounts:
            return self.corrupt_packed(mounts["packed"], path[len("/packed/"):])
        if not path.startswith("/tiny/"):
            return self.send(404, b"not found", "text/plain")
        rel = path[len("/tiny/"):]
        body = self.read(ens, rel)
        if body is None:
            return self.send(404, b"not found", "text/plain")
        if rel == "manifest.json" and view == "v99":
            m = json.loads(body)
            m["version"] = 99
            body = json.dumps(m).encode()
        if rel == "manifest.json" and view == "garbage":
            body = b"<html>this is not a manifest</html>"
        if rel == "manifest.json" and view in ("chatml", "strict"):
            m = json.loads(body)
            m["chat"]["template"], m["chat"]["jinja"] = ("chatml", None) if view == "chatml" else ("jinja", STRICT)
            body = json.dumps(m).encode()
        flip = {"badbase": manifest["base"]["file"], "badtok": manifest["tokenizer"]["file"],
                "corrupt": victim, "stale": victim if state["stale"] else None}.get(view)
        if rel == flip:
            body = bytearray(body)
            body[len(body) // 3] ^= 0x5A
            body = bytes(body)
        if rel == victim and view == "missing":
            return self.send(404, b"not found", "text/plain")
        if rel == victim and view == "truncated":
            body = body[: len(body) // 2]
        if rel == victim and view == "long":
            body = body + body
        cut = view == "net" and state["fail"] and rel.startswith("modules/")
        if cut and state.get("fail_left", -1) >= 0:
            with lock:
                state["fail_left"] -= 1
                if state["fail_left"] < 0:
                    cut = state["fail"] = False
        ctype = "application/json" if rel.endswith(".json") else "application/octet-stream"
        self.send(200, body, ctype, cut and state["mode"], cacheable=view == "stale" and state["stale"])

    def corrupt_packed(self, root, rel):
        """The packed ensemble with the step-1 version's byte flipped inside its pack."""
        body = self.read(root, rel)
        if body is None:
            return self.send(404, b"not found", "text/plain")
        m = json.load(open(os.path.join(root, "manifest.json")))
        v = next(v for v in m["modules"] if v["file"] == victim)
        if rel == v["pack"]["pack"]:
            body = bytearray(body)
            body[v["pack"]["offset"] + v["bytes"] // 3] ^= 0x5A
            body = bytes(body)
        self.send(200, body, "application/json" if rel.endswith(".json") else "application/octet-stream")

    def read(self, root, rel):
        p = os.path.normpath(os.path.join(root, rel))
        if not p.startswith(root) or not os.path.isfile(p):
            return None
        with open(p, "rb") as f:
            return f.read()

    def file(self, root, rel):
        body = self.read(root, rel or "index.html")
        if body is None:
            return self.send(404, b"not found", "text/plain")
        types = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript",
                 ".wasm": "application/wasm", ".json": "application/json"}
        self.send(200, body, types.get(os.path.splitext(rel)[1], "application/octet-stream"))


srv = Server(("127.0.0.1", port), Handler)
print(f"http://127.0.0.1:{srv.server_address[1]}", flush=True)
srv.serve_forever()
