"""A loopback stand-in for an Ollama server: enough of ``POST /api/chat`` (non-streaming) for
the ``ollama`` Python client, with selectable misbehaviour.

Modes, per request:

* ``"ok"``: a deterministic answer that differs per (question, seed), sometimes numbered or quoted
  the way LLMs do, so cleaning has something to do.
* ``"slow"``: waits ``delay_s`` before answering (beyond the client's timeout).
* ``"malformed"``: HTTP 200 with a body that is not JSON.
* ``"no_message"``: HTTP 200, JSON without the ``message`` field.
* ``"error500"``: HTTP 500 with an Ollama-style ``{"error": ...}`` body.
* ``"repetitive"``: like ok, but every seed gets the same answer up to a comma (near duplicates).
* ``"empty"``: a well-formed reply whose content is empty.
* ``"missing_model"``: HTTP 404 ``model not found`` (what Ollama says for an unpulled model).

``script`` (a list of modes) is consumed first, one per request; then ``ok_budget`` (if set)
ok answers are served before switching to ``exhausted_mode``; otherwise ``mode`` applies.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

FEATURES = (
    "four legs",
    "a long tail",
    "pointed ears",
    "soft fur",
    "bright eyes",
    "sharp claws",
    "a small nose",
    "striped markings",
    "a round body",
    "long whiskers",
    "a short neck",
    "webbed feet",
    "a curved beak",
    "spotted skin",
    "a flat face",
    "large wings",
    "a bushy mane",
    "shiny scales",
    "thin antennae",
    "a hard shell",
    "a fluffy coat",
    "big paws",
    "a pink snout",
    "tiny horns",
    "a wagging tail",
)
PLACES = (
    "in a garden",
    "on a beach",
    "in a forest",
    "in a city street",
    "on a farm",
    "in snow",
    "at night",
    "under water",
    "in a living room",
    "on a mountain",
)


def answer_text(question: str, seed: int, repetitive: bool = False) -> str:
    """The stand-in's reply to ``question`` for answer index ``seed`` (deterministic)."""
    h = int(hashlib.sha256(question.encode()).hexdigest(), 16)
    subject = question.rstrip("?.: ").split(" a ", 1)[-1]
    for tail in (" looks like", " look like"):
        subject = subject.removesuffix(tail)
    feat = FEATURES[(h + 7 * seed) % len(FEATURES)]
    place = PLACES[(h // 7 + 3 * seed) % len(PLACES)]
    body = f"A {subject} with {feat}, seen {place} (take {seed})."
    if repetitive:  # the same sentence for every seed, up to a comma: a near duplicate
        feat, place = FEATURES[h % len(FEATURES)], PLACES[(h // 7) % len(PLACES)]
        return f"A {subject} with {feat}{',' if seed % 2 else ''} seen {place}."
    # Some replies wrapped the way chat models do, to be cleaned away.
    if seed % 3 == 1:
        return f'1. "{body}"'
    if seed % 3 == 2:
        return f"  - {body}  "
    return body


class OllamaStandin:
    """Threaded HTTP server on 127.0.0.1 at a free port; use as a context manager."""

    def __init__(self, mode: str = "ok", delay_s: float = 2.0):
        self.mode = mode
        self.delay_s = delay_s
        self.script: list[str] = []
        self.ok_budget: Optional[int] = None
        self.exhausted_mode = "error500"
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._release = threading.Event()  # set at shutdown so slow handlers return at once
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread: Optional[threading.Thread] = None

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def start(self) -> OllamaStandin:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OllamaStandin:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_mode(self) -> str:
        with self._lock:
            if self.script:
                return self.script.pop(0)
            if self.ok_budget is not None:
                if self.ok_budget <= 0:
                    return self.exhausted_mode
                self.ok_budget -= 1
                return "ok"
            return self.mode

    def _handler_class(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    req = json.loads(raw or b"{}")
                except ValueError:
                    req = {}
                with standin._lock:
                    standin.requests.append({"path": self.path, "body": req})
                if self.path != "/api/chat":
                    self._send(404, json.dumps({"error": f"no route {self.path}"}).encode())
                    return
                mode = standin._next_mode()
                model = req.get("model", "")
                if mode == "slow":
                    standin._release.wait(standin.delay_s)
                    mode = "ok"
                if mode == "malformed":
                    self._send(200, b'{"model": "x", "message": {"role": "assist')
                elif mode == "no_message":
                    self._send(200, json.dumps({"model": model, "done": True}).encode())
                elif mode == "error500":
                    self._send(500, json.dumps({"error": "llama runner process has terminated"}).encode())
                elif mode == "missing_model":
                    self._send(404, json.dumps({"error": f"model '{model}' not found"}).encode())
                else:
                    question = next(
                        (m.get("content", "") for m in reversed(req.get("messages", [])) if m.get("role") == "user"), ""
                    )
                    seed = int((req.get("options") or {}).get("seed", 0))
                    content = "" if mode == "empty" else answer_text(question, seed, mode == "repetitive")
                    self._send(
                        200,
                        json.dumps(
                            {
                                "model": model,
                                "created_at": "2024-01-01T00:00:00Z",
                                "message": {"role": "assistant", "content": content},
                                "done": True,
                                "done_reason": "stop",
                            }
                        ).encode(),
                    )

        return Handler


def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused at once)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
