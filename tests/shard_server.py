"""A local HTTP server of .tar shards with failures on demand, for tests/test_http_shards.py.

URL path /MODES/NAME serves the file NAME of the folder; MODES is "ok" or flags joined by "+":
    norange   ignore Range headers (answer 200 with the whole file, as python -m http.server does)
    cut       send `cut_bytes` of the body with the full Content-Length, then close the connection (every time)
    cut1      the same on the first request for NAME only
    stall     send `cut_bytes`, then nothing for `stall_s` seconds
Range requests (bytes=N-) are answered 206 unless norange. `hits[(modes, name)]` counts the requests.
"""
from __future__ import annotations

import os
import re
import socket
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

from PIL import Image


class ShardHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        modes, _, name = self.path.lstrip("/").partition("/")
        flags = set(modes.split("+"))
        path = os.path.join(self.server.root, name)
        with self.server.lock:
            self.server.hits[(modes, name)] += 1
            first = self.server.hits[(modes, name)] == 1
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = open(path, "rb").read()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and "norange" not in flags:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if "cut" in flags or ("cut1" in flags and first):
            self.wfile.write(body[: self.server.cut_bytes])
            return  # HTTP/1.0: the connection closes here, short of Content-Length
        if "stall" in flags:
            self.wfile.write(body[: self.server.cut_bytes])
            self.wfile.flush()
            time.sleep(self.server.stall_s)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ShardServer(ThreadingHTTPServer):
    daemon_threads, block_on_close = True, False  # a stalling handler must not hold up shutdown

    def __init__(self, root: str, stall_s: float = 5.0, cut_bytes: int = 3000):
        super().__init__(("127.0.0.1", 0), ShardHandler)
        self.root, self.stall_s, self.cut_bytes = root, stall_s, cut_bytes  # 3000 bytes: one record and a half
        self.hits, self.lock = Counter(), threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self, modes: str = "ok") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{modes}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def free_port() -> int:
    """Returns a port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    out = BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


def write_shards(root: str, shards: int = 8, per_shard: int = 6) -> list[str]:
    """Writes root/000000.tar ... with keys s{shard}_{i} (16 px PNG + caption, 2 KiB a record with the tar
    headers, so a shard's records end at 12 KiB of its 20 KiB); returns every key."""
    os.makedirs(root, exist_ok=True)
    keys = []
    for shard in range(shards):
        with tarfile.open(os.path.join(root, f"{shard:06d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"s{shard}_{i}"
                colour = (40 * shard % 256, 37 * i % 256, (shard * per_shard + i) * 5 % 256)
                for extension, payload in (("png", png(colour)), ("txt", f"a square {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, BytesIO(payload))
                keys.append(key)
    return keys
