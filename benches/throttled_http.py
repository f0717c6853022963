#!/usr/bin/env python3
"""Serves a folder over http on 127.0.0.1 at a capped rate per response, as a source server
on a real network would (benches/p1_vs_cli.sh with RATE_MIBS=N).
Usage: throttled_http.py PORT DIR RATE_MIBS"""
import http.server
import os
import sys
import time

PORT, ROOT, RATE = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]) * (1 << 20)
PIECE = 64 * 1024


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = os.path.join(ROOT, os.path.basename(self.path))
        if not os.path.isfile(path):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.end_headers()
        start, sent = time.monotonic(), 0
        with open(path, "rb") as f:
            while piece := f.read(PIECE):
                self.wfile.write(piece)
                sent += len(piece)
                ahead = sent / RATE - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
