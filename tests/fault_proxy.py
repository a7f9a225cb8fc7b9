"""A loopback HTTP proxy that breaks some requests on their way to a real server.

Each request is, at a set rate, answered with a 500 or 503 instead of being forwarded, or its
connection is reset before it is forwarded, or *after* (the server acted, the client never
hears: the case that makes a retried conditional create see its own object), or it stalls for
``stall_s`` before being forwarded (longer than the client's timeout, it is a request the client
gave up on and retried, which still reaches the server late). The number of faults is bounded,
so clients that retry eventually get through, and the proxy stops itself after a time limit in
case a test forgets to.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("500", "503", "reset_before", "reset_after", "stall")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "content-length"}


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        *,
        rate: float,
        max_faults: int,
        faults: tuple[str, ...] = FAULTS,
        only: Callable[[str, str], bool] | None = None,
        seed: int = 0,
        stall_s: float = 0.5,
        limit_s: float = 300,
    ) -> None:
        """``faults``: the kinds to draw from; ``only(method, path)``: which requests may be
        broken (all by default)."""
        self.upstream_url = upstream
        target = urlsplit(upstream)
        self.upstream = (target.hostname or "127.0.0.1", target.port or 80)
        self.rate, self.max_faults, self.faults, self.only = rate, max_faults, faults, only
        self.stall_s = stall_s
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self.log: list[tuple[str, str, str]] = []  # (fault, method, path): for failure messages
        self.requests = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(limit_s, self.stop)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def pick_fault(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests += 1
            if self.only is not None and not self.only(method, path):
                return None
            if sum(self.injected.values()) >= self.max_faults or self.rng.random() >= self.rate:
                return None
            fault = self.rng.choice(self.faults)
            self.injected[fault] += 1
            self.log.append((fault, method, path))
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return None

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            return bytes(out)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True

            def _relay(self) -> None:
                body = self._body()
                fault = proxy.pick_fault(self.command, self.path)
                if fault in ("500", "503"):
                    code = "InternalError" if fault == "500" else "SlowDown"
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>"
                    data = payload.encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if fault == "reset_before":
                    self._reset()
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if fault == "reset_after":
                    self._reset()
                    return
                try:
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP:
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except OSError:  # the client gave up on a stalled request
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
