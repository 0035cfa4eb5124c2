"""deploy.serve's HTTP and metrics ports: Triton's, forwarded unchanged, with the 503s it answers counted.

Triton 2.51 counts no queue-full rejection: its dynamic batcher refuses a request past
`max_queue_size` in `Enqueue`, before any statistics are taken and before the model could see it
(`nv_inference_request_failure{reason="REJECTED"}` stayed 0 after 18 of them, measured; docs/serving.md,
"Metrics"). Every HTTP client request passes here, so here is where they are counted:
`flux2_requests_rejected_total{model, reason="queue_full"|"timeout"|"other"}`, one per 503 a client
received, added to Triton's own text on the metrics port, which Prometheus already scrapes.

- The HTTP port forwards each request to Triton's HTTP endpoint (on loopback, a port of its own) over a
  fresh loopback connection and streams the answer back, headers and body unchanged: KServe v2
  clients see Triton. A 503's body (Triton's `{"error": "..."}`) names the reason.
- The metrics port answers `/metrics`: Triton's metrics, then these counters.
- gRPC goes to Triton directly and is not counted here (docs/serving.md).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REJECTED = "flux2_requests_rejected_total"
# Triton's messages for its two 503s (the model answers its own timeouts with Triton's words, deploy/model.py).
REASONS = (("Exceeds maximum queue size", "queue_full"), ("Request timeout expired", "timeout"))
# Headers of one connection, not of the message (RFC 9110 7.6.1): never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/")
CHUNK = 1 << 16


def rejection_reason(message: str) -> str:
    """The `reason` label of a 503 from Triton's error message."""
    return next((reason for text, reason in REASONS if text in message), "other")


def loopback_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, distinct (held open together), for Triton's own HTTP and metrics."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _label(value: str) -> str:
    """A Prometheus label value, escaped (text format 0.0.4): the model name comes from the request's path."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class RejectionCounter:
    """503s per (model, reason); every model of the repository starts at 0, so that rate() sees the first."""

    def __init__(self, models=()):
        self._lock = threading.Lock()
        self._counts = {(model, reason): 0 for model in models for _, reason in REASONS}

    def add(self, model: str, reason: str) -> None:
        with self._lock:
            self._counts[model, reason] = self._counts.get((model, reason), 0) + 1

    def exposition(self) -> str:
        """Prometheus text format (0.0.4) of the counter."""
        with self._lock:
            counts = sorted(self._counts.items())
        lines = [
            f"# HELP {REJECTED} requests answered 503 on the HTTP port, by reason (queue_full, timeout, other)",
            f"# TYPE {REJECTED} counter",
        ]
        lines += [f'{REJECTED}{{model="{_label(model)}",reason="{reason}"}} {n}' for (model, reason), n in counts]
        return "\n".join(lines) + "\n"


class _Forward(BaseHTTPRequestHandler):
    """One client connection (HTTP/1.1, kept alive); each request goes to Triton on a connection of its own."""

    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def do_GET(self):  # noqa: N802  (http.server's names)
        self._forward()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def log_message(self, *args):  # Triton logs requests itself (--log-verbose); nothing per request here
        pass

    def _request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self):
        self._started = False  # once the status line is out, a failure can only close the connection
        body = self._request_body()
        # The client's headers as sent (repeated ones too), less those of its connection; Expect:
        # 100-continue was answered here (http.server), and the body's length is known now.
        skip = HOP_BY_HOP | {"expect", "content-length"}
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in skip]
        if body or self.command in ("POST", "PUT"):
            headers.append(("Content-Length", str(len(body))))
        with self.server.in_flight:
            upstream = http.client.HTTPConnection("127.0.0.1", self.server.triton_http_port)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in headers:
                    upstream.putheader(key, value)
                upstream.endheaders(body or None)
                self._answer(upstream.getresponse())
            except (http.client.HTTPException, OSError) as exc:
                self.close_connection = True
                if not self._started:
                    self._send_error(502, f"tritonserver is not answering on its HTTP port ({exc})")
            finally:
                upstream.close()

    def _answer(self, answer: http.client.HTTPResponse):
        headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in HOP_BY_HOP]
        if answer.status == 503:  # small: Triton's one-line JSON error
            body = answer.read()
            self._count(body)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            self._start(answer.status, answer.reason, [*headers, ("Content-Length", str(len(body)))])
            self.wfile.write(body)
            return
        chunked = answer.chunked  # Triton streams (generate_stream): pass each piece on as it comes
        if not chunked and answer.getheader("Content-Length") is None and self.command != "HEAD":
            self.close_connection = True  # a body that ends when the connection does ends so here too
        self._start(answer.status, answer.reason, headers + ([("Transfer-Encoding", "chunked")] if chunked else []))
        while piece := (answer.read1(CHUNK) if chunked else answer.read(CHUNK)):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _start(self, status: int, reason: str, headers):
        self.send_response_only(status, reason)
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self._started = True

    def _count(self, body: bytes):
        match = INFER_PATH.match(self.path)
        try:
            message = str(json.loads(body).get("error", ""))
        except (ValueError, AttributeError):
            message = body.decode(errors="replace")
        model = urllib.parse.unquote(match.group(1)) if match else ""
        self.server.rejections.add(model, rejection_reason(message))

    def _send_error(self, status: int, message: str):
        body = json.dumps({"error": message}).encode()
        try:
            self._start(status, http.client.responses[status], [("Content-Type", "application/json"),
                                                                ("Content-Length", str(len(body)))])  # fmt: skip
            self.wfile.write(body)
        except OSError:  # the client left as well
            pass


class _Metrics(BaseHTTPRequestHandler):
    """GET /metrics: Triton's metrics, then the rejection counter."""

    server: _ProxyServer

    def do_GET(self):  # noqa: N802
        if urllib.parse.urlsplit(self.path).path != "/metrics":
            self.send_error(404)
            return
        triton = http.client.HTTPConnection("127.0.0.1", self.server.triton_metrics_port, timeout=30)
        try:
            triton.request("GET", "/metrics")
            answer = triton.getresponse()
            triton_text, status = answer.read().decode(), answer.status
        except (http.client.HTTPException, OSError) as exc:
            self.send_error(502, f"tritonserver is not answering on its metrics port ({exc})")
            return
        finally:
            triton.close()
        body = (triton_text + ("" if triton_text.endswith("\n") or not triton_text else "\n")).encode()
        body += self.server.rejections.exposition().encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _InFlight:
    """How many requests are being forwarded: the proxy closes only once Triton's last answer is passed on."""

    def __init__(self):
        self.count, self._lock = 0, threading.Condition()

    def __enter__(self):
        with self._lock:
            self.count += 1

    def __exit__(self, *exc):
        with self._lock:
            self.count -= 1
            self._lock.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self.count == 0, timeout=timeout_s)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True  # an idle kept-alive client connection must not hold the process open
    block_on_close = False


class CountingProxy:
    """The HTTP and metrics ports on `host`, in front of Triton's on loopback; threads of this process."""

    def __init__(self, *, host: str, ports: tuple[int, int], triton_ports: tuple[int, int], models=()):
        self.rejections = RejectionCounter(models)
        self.in_flight = _InFlight()
        self._servers = []
        for port, handler in zip(ports, (_Forward, _Metrics)):
            server = _ProxyServer((host, port), handler)
            server.triton_http_port, server.triton_metrics_port = triton_ports
            server.rejections, server.in_flight = self.rejections, self.in_flight
            self._servers.append(server)
        # shutdown() waits out one poll of serve_forever: 0.1 s, not the default 0.5 s, per port
        self._threads = [threading.Thread(target=s.serve_forever, args=(0.1,), daemon=True) for s in self._servers]

    def start(self) -> CountingProxy:
        for thread in self._threads:
            thread.start()
        return self

    def close(self, drain_s: float = 30.0) -> None:
        """Stop listening; wait (bounded) for the answers being passed on, so none is cut off."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self.in_flight.wait_idle(drain_s)
