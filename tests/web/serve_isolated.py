#!/usr/bin/env python3
"""A plain static file server (python's http.server: no Range requests, no server logic) that
also sends COOP/COEP, so pages it serves are cross-origin isolated and the CPU backend runs on
threads (js/API.md "Threads"). `./build.sh demo` serves the chat page with it; the end-to-end
tests serve the site with it to check the page on such a host.

Usage: serve_isolated.py PORT DIRECTORY
"""
import functools, http.server, sys


class Isolated(http.server.SimpleHTTPRequestHandler):
    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    port, root = int(sys.argv[1]), sys.argv[2]
    handler = functools.partial(Isolated, directory=root)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()
