"""A real local HTTP(S) server for URL-input tests: images, redirects, errors, slow
and oversized bodies. It records every connection and request it receives, so a
test can prove that a refused URL never reached it."""

from __future__ import annotations

import gzip
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    """What the server received."""

    connections: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, image: bytes, *, tls: ssl.SSLContext | None = None):
        self.image = image
        self.seen = Seen()
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def verify_request(self, request, client_address) -> bool:
        with self.seen.lock:
            self.seen.connections += 1
        return True

    @property
    def port(self) -> int:
        return self.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ImageServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        with self.server.seen.lock:
            self.server.seen.requests.append((self.path, self.headers.get("Host", "")))
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        route = parts[0]
        if route == "image.png":
            self._send(200, self.server.image, "image/png")
        elif route == "redirect":  # /redirect/N (N >= 1): N redirects, the last to the image
            hops = int(parts[1])
            location = f"/redirect/{hops - 1}" if hops > 1 else "/image.png"
            self._send(302, b"", "text/plain", Location=location)
        elif route == "to":  # /to?url=...: one redirect there
            self._send(302, b"", "text/plain", Location=parse_qs(url.query)["url"][0])
        elif route == "status":
            self._send(int(parts[1]), b"remote says no", "text/plain")
        elif route == "declared-big":  # an honest Content-Length over the limit
            self._send(200, b"\0" * int(parts[1]), "image/png")
        elif route == "stream-big":  # no Content-Length: only counting while reading catches it
            self._stream(b"\0" * 16384, count=int(parts[1]) // 16384 + 1, pause_s=0)
        elif route == "slow":  # a byte at a time, for ever (until the client gives up)
            self._stream(b"\x89", count=10**6, pause_s=0.05)
        elif route == "gzip":
            self._send(200, gzip.compress(self.server.image), "image/png", **{"Content-Encoding": "gzip"})
        else:
            self._send(404, b"no such thing", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, chunk: bytes, *, count: int, pause_s: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(count):
                self.wfile.write(chunk)
                self.wfile.flush()
                if pause_s:
                    time.sleep(pause_s)  # the server's pace, not a test's wait
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading: what the tests expect
        self.close_connection = True
