"""HTTP load generator: N requests at concurrency C against an image endpoint, from its own process.

Prints requests/s and latency percentiles (``--json`` for machines). Any non-2xx answer or
connection error counts as an error. Used by ``bench/serve.py`` and by the serving load test.

    python bench/loadgen.py http://127.0.0.1:8000/predict --requests 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time

import numpy as np


def sample_jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def _run(url: str, body: bytes, requests: int, concurrency: int, warmup: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    remaining = iter(range(warmup + requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for i in remaining:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers={"Content-Type": "image/jpeg"}) as r:
                        await r.read()
                        ok = 200 <= r.status < 300
                        reason = f"HTTP {r.status}"
                except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
                    ok, reason = False, f"{type(exc).__name__}: {exc}"
                if i < warmup:
                    continue
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors.append(reason)

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
