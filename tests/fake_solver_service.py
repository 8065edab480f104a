"""Stand-ins for a misbehaving solver service, for the client's tests: one that accepts connections and never
answers (blocked), and one that answers like the service but with whatever job state and result bytes the test
sets (a job that never finishes, a damaged or wrong result)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

JOB_ID = "0" * 32 + "-" + "0" * 16


@contextlib.contextmanager
def silent_service() -> Iterator[str]:
    """The URL of a port whose connections complete (kernel backlog) but are never read or answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


class FakeSolverService:
    """Answers POST /jobs and GET /jobs/<id> with `state`, GET /jobs/<id>/result with `result` (bytes), after
    `conflicts` 409 answers (what the service says while it re-solves a result it found missing or damaged)."""

    def __init__(self, state: str = "done", result: bytes = b"", conflicts: int = 0):
        self.state, self.result, self.conflicts = state, result, conflicts
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, body: bytes, content_type: str, code: int = 200) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.do_GET()

            def do_GET(self):
                if self.path.endswith("/result") and fake.conflicts > 0:
                    fake.conflicts -= 1
                    return self._send(b'{"error": "solving again"}', "application/json", 409)
                if self.path.endswith("/result"):
                    return self._send(fake.result, "application/octet-stream")
                self._send(json.dumps({"job_id": JOB_ID, "state": fake.state}).encode(), "application/json")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FakeSolverService":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
