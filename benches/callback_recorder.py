"""A callback receiver for the benches: answers 200 to every POST and appends
`<epoch seconds> <path> <body>` to the file named by argv[2] the moment a request arrives.
Usage: python3 benches/callback_recorder.py PORT FILE"""
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, path = int(sys.argv[1]), sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        at = time.time()
        body = self.rfile.read(int(self.headers.get("content-length", 0))).decode()
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
        with open(path, "a") as f:
            f.write(f"{at:.6f} {self.path} {body}\n")

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
