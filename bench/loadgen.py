"""HTTP load generator: N requests at concurrency C against an image endpoint, from its own process.

Prints requests/s and latency percentiles (``--json`` for machines). Any non-2xx answer or
connection error counts as an error. Used by ``bench/serve.py`` and by the serving load tests.
Each of the C clients keeps one HTTP/1.1 connection open and sends one prepared request after
another; the answers are parsed by httptools. It shares the cores with the server under test, so it
is kept cheap: half the CPU per request of the aiohttp client it replaced, or less.

    python bench/loadgen.py http://127.0.0.1:8000/predict --requests 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
import urllib.parse

import httptools
import numpy as np

TIMEOUT_S = 120  # a request (or a connection) that takes longer counts as an error


def sample_jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; ``exchange`` sends a prepared request and returns the
    answer's status. Responses are parsed by httptools (uvicorn's C parser): the load generator
    shares the machine with the server, so what it costs a request is taken from the server."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def on_message_complete(self) -> None:  # called by the parser
        if self.answer is not None and not self.answer.done():
            self.answer.set_result((self.parser.get_status_code(), self.parser.should_keep_alive()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, request: bytes, timeout: float) -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        self.answer = loop.create_future()
        timer = loop.call_later(timeout, self._fail, TimeoutError(f"no answer in {timeout:.0f} s"))
        self.transport.write(request)
        try:
            return await self.answer
        finally:
            timer.cancel()


def http_request(url: str, body: bytes, content_type: str = "image/jpeg") -> tuple[str, int, bytes]:
    """(host, port, the whole POST request as bytes) for ``url`` (pure)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, not {url!r}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return host, port, head.encode() + body


async def _run(url: str, body: bytes, requests: int, concurrency: int, warmup: int) -> dict:
    loop = asyncio.get_running_loop()
    host, port, request = http_request(url, body)
    latencies: list[float] = []
    errors: list[str] = []
    remaining = iter(range(warmup + requests))

    async def worker() -> None:
        conn: _Connection | None = None
        for i in remaining:
            t0 = time.perf_counter()
            try:
                if conn is None or conn.transport is None:
                    connecting = loop.create_connection(_Connection, host, port)
                    _, conn = await asyncio.wait_for(connecting, TIMEOUT_S)
                status, keep_alive = await conn.exchange(request, TIMEOUT_S)
                ok, reason = 200 <= status < 300, f"HTTP {status}"
                if not keep_alive:
                    conn.transport.close()
                    conn = None
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
                ok, reason = False, f"{type(exc).__name__}: {exc}"
                if conn is not None and conn.transport is not None:
                    conn.transport.close()
                conn = None
            if i < warmup:
                continue
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors.append(reason)
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    # warm-up requests are sent first by the same workers and left out of the numbers
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "url": url,
        "requests": requests,
        "warmup": warmup,  # answered too, before the timed requests
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "seconds": round(seconds, 3),
        "rps": len(latencies) / seconds if seconds > 0 else 0.0,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def run(url: str, *, requests: int, concurrency: int, body: bytes | None = None, warmup: int = 20) -> dict:
    """Load ``url`` and return the statistics (the wall time includes the warm-up requests)."""
    return asyncio.run(_run(url, body or sample_jpeg(), requests, concurrency, warmup))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--image", help="file to post (default: a generated 64x48 JPEG)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    body = open(args.image, "rb").read() if args.image else None
    stats = run(args.url, requests=args.requests, concurrency=args.concurrency, body=body, warmup=args.warmup)
    if args.json:
        print(json.dumps(stats))
    else:
        print(
            f"{stats['ok']} ok, {stats['errors']} errors in {stats['seconds']:.1f} s: {stats['rps']:.0f} requests/s, "
            f"p50 {stats['p50_ms']:.1f} ms, p99 {stats['p99_ms']:.1f} ms"
        )
    sys.exit(1 if stats["errors"] else 0)


if __name__ == "__main__":
    main()
