"""Remote shards: http(s):// URLs and `pipe:CMD` commands read as one byte stream that retries, times out and
says why it failed.

    stream = open_remote("http://host:8000/shards/000001.tar", timeout=30, retries=3)
    tarfile.open(fileobj=stream, mode="r|*")        # read(n) -> bytes; raises ShardError(reason) when it gives up

Why not webdataset's `gopen` (http via `curl -f -s -L`, `pipe:` via a shell), the library the issue names:
  * its reads have no read timeout: a server that stops sending mid-shard blocks a DataLoader worker forever;
  * curl's `--retry` after a partial transfer writes the shard's head into the pipe a second time, so the tar
    reader would yield records twice; and a failure reaches the caller only as "exit N" when the pipe closes,
    so a 404 cannot be told from a refused connection.
What this module adds, with the standard library only (urllib, subprocess, select):
  * http(s): `timeout` seconds on the connect and on every read; a retry after a partial read asks for the rest
    (`Range: bytes=N-`, RFC 9110 section 14.2) and, from a server that ignores Range (answers 200), re-reads
    and discards the first N bytes. Either way the tar reader sees one seamless stream: a record is never
    yielded twice, and none is lost to a transient failure.
  * pipe:CMD (e.g. `pipe:aws s3 cp s3://bucket/000001.tar -`): the command's stdout through select() with the
    same timeout; a retry re-runs the command and discards the bytes already read; exit status 0 required.
  * after `retries` retries (backoff 0.5 s, 1 s, 2 s, ...) ShardError(reason) with an ldm.data.skips reason:
    shard_unreachable (refused, reset, DNS), shard_http_404 (404/410: not retried), shard_http_error (other
    statuses; 4xx other than 408/429 are not retried), shard_stalled (no byte for `timeout` s), pipe_failed
    (the command's exit status), truncated_shard (the connection kept ending before Content-Length).
A shard's worst case is therefore bounded: about (retries + 1) x timeout plus the backoff, never a hang.
"""
from __future__ import annotations

import io
import logging
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from urllib.parse import urlparse

REMOTE_SCHEMES = ("http://", "https://", "pipe:")
CHUNK = 1 << 20
PERMANENT_HTTP = (404, 410)
logger = logging.getLogger("ldm.data")


def is_remote(spec: str) -> bool:
    """Returns whether a data spec (or shard) names remote shards: http(s):// or pipe:."""
    return isinstance(spec, str) and spec.lower().startswith(REMOTE_SCHEMES)


def shard_name(unit: str) -> str:
    """Returns a short name for messages: the URL's or the command's last `*.tar` name, else the unit itself."""
    names = re.findall(r"[^\s/'\"]+\.(?:tar\.gz|tgz|tar)\b", unit)
    return names[-1] if names else unit


class ShardError(Exception):
    """A failed read of a remote shard; `reason` is a key of ldm.data.skips.REASONS. RemoteShard retries the
    retryable ones; the caller sees only the one that ends the shard."""

    def __init__(self, reason: str, detail: str, retryable: bool = True):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retryable = reason, detail, retryable


def http_error(error: BaseException, url: str) -> ShardError:
    """Returns the ShardError for an exception raised while opening or reading an http(s) URL."""
    if isinstance(error, urllib.error.HTTPError):
        if error.code in PERMANENT_HTTP:
            return ShardError("shard_http_404", f"{url}: HTTP {error.code}", retryable=False)
        permanent = 400 <= error.code < 500 and error.code not in (408, 429)
        return ShardError("shard_http_error", f"{url}: HTTP {error.code}", retryable=not permanent)
    reason = getattr(error, "reason", error)  # URLError wraps the socket's exception
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return ShardError("shard_stalled", f"{url}: nothing received for the read timeout")
    if isinstance(error, HTTPException):  # IncompleteRead of a chunked body, a malformed status line
        return ShardError("truncated_shard", f"{url}: {type(error).__name__}")
    return ShardError("shard_unreachable", f"{url}: {reason}")


def discard(body, offset: int, position: int, name: str) -> None:
    """Reads and drops `body`'s bytes from `position` up to `offset`; closes it and raises if it ends first."""
    try:
        while position < offset:
            data = body.read(min(CHUNK, offset - position))
            if not data:
                raise ShardError("truncated_shard", f"{name}: ended before byte {offset} on a retry")
            position += len(data)
    except ShardError:
        body.close()  # RemoteShard never held this body: end its connection or command here
        raise


class HTTPBody:
    """One GET of `url` from byte `offset` on: read(n) -> bytes (b"" at the end), raising ShardError."""

    def __init__(self, url: str, offset: int, timeout: float):
        self.url = url
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            self.response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except (urllib.error.URLError, OSError, HTTPException) as e:
            raise http_error(e, url) from e
        length = self.response.headers.get("Content-Length")
        resumed = offset and self.response.status == 206
        self.end = (offset if resumed else 0) + int(length) if length is not None else None  # None: chunked
        self.position = offset if resumed else 0
        if offset and not resumed:  # the server ignored Range: skip what the tar reader already has
            discard(self, offset, self.position, url)

    def read(self, size: int) -> bytes:
        try:
            data = self.response.read(size)
        except (OSError, HTTPException) as e:
            raise http_error(e, self.url) from e
        self.position += len(data)
        if not data and size and self.end is not None and self.position < self.end:
            raise ShardError("truncated_shard", f"{self.url}: connection ended at byte {self.position} of "
                                                f"{self.end}")
        return data

    def close(self) -> None:
        self.response.close()


class PipeBody:
    """stdout of a shell command from byte `offset` on: read(n) -> bytes (b"" at the end), raising ShardError."""

    def __init__(self, command: str, offset: int, timeout: float):
        self.command, self.timeout = command, timeout
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr,
                                        start_new_session=True)  # its own group: close() ends its children too
        discard(self, offset, 0, repr(command))  # a re-run cannot seek: drop the bytes the tar reader already has

    def read(self, size: int) -> bytes:
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        if not ready:
            raise ShardError("shard_stalled", f"{self.command!r} wrote nothing for {self.timeout:g} s")
        data = os.read(self.process.stdout.fileno(), size)
        if not data and size:
            try:
                status = self.process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise ShardError("shard_stalled", f"{self.command!r} closed its output but did not exit") from None
            if status != 0:
                self.stderr.seek(0)
                tail = self.stderr.read()[-300:].decode("utf-8", "replace").strip()
                raise ShardError("pipe_failed", f"{self.command!r} exited with status {status}: {tail}")
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.stdout.close()
        self.process.wait()
        self.stderr.close()


class RemoteShard(io.RawIOBase):
    """A read-only stream of one remote shard; reconnects from the byte reached, at most `retries` times."""

    def __init__(self, unit: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5):
        self.unit, self.timeout, self.retries, self.backoff = unit, timeout, retries, backoff
        self.offset, self.failures, self.body = 0, 0, None

    def readable(self) -> bool:
        return True

    def _connect(self):
        if self.unit.lower().startswith("pipe:"):
            return PipeBody(self.unit[len("pipe:"):], self.offset, self.timeout)
        return HTTPBody(self.unit, self.offset, self.timeout)

    def read(self, size: int = -1) -> bytes:
        size = CHUNK if size is None or size < 0 else size
        while True:
            try:
                if self.body is None:
                    self.body = self._connect()
                data = self.body.read(size)
                self.offset += len(data)
                return data
            except ShardError as e:
                self._drop_body()
                self.failures += 1
                if not e.retryable or self.failures > self.retries:
                    raise
                logger.warning("%s; retry %d of %d from byte %d", e, self.failures, self.retries, self.offset)
                time.sleep(self.backoff * 2 ** (self.failures - 1))

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def _drop_body(self) -> None:
        if self.body is not None:
            body, self.body = self.body, None
            body.close()

    def close(self) -> None:
        self._drop_body()
        super().close()


def check_remote(unit: str) -> str:
    """Returns `unit` after checking that it is an http(s) URL with a host or a pipe: with a command."""
    if not is_remote(unit):
        raise ValueError(f"{unit!r} is not remote: write http://..., https://... or pipe:COMMAND")
    if unit.lower().startswith("pipe:") and not unit[len("pipe:"):].strip():
        raise ValueError(f"{unit!r}: pipe: needs a command that writes the shard to stdout, e.g. "
                         "'pipe:curl -s -L https://host/000000.tar'")
    if urlparse(unit).scheme in ("http", "https") and not urlparse(unit).netloc:
        raise ValueError(f"{unit!r} has no host; write e.g. http://host:8000/shards/{{000000..000031}}.tar")
    return unit


def open_remote(unit: str, timeout: float = 30.0, retries: int = 3) -> RemoteShard:
    """Returns the stream of an http(s):// URL or a pipe:CMD; nothing is fetched before the first read."""
    return RemoteShard(check_remote(unit), timeout, retries)
