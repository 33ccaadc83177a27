"""Ingest throughput: our Ray Data pipeline against a plain multiprocessing Pillow loop.

Both decode, resize and normalize the same JPEG files into NCHW float batches with the same number
of processes, in one run, so the ratio holds however busy the machine is.

    python bench/ingest.py --images 3000 --procs 2
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BATCH = 64


def make_photos(root: Path, n: int, src: tuple[int, int], seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients plus texture) under root/{train,validation}/{a,b}/."""
    rng = np.random.default_rng(seed)
    w, h = src
    yy, xx = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        split = "validation" if i % 50 < 2 else "train"
        cls = "ab"[i % 2]
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-0.5, 0.5, (2, 3))
        img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 12, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        path = folder / f"img_{i:05d}.jpg"
        path.write_bytes(buf.getvalue())
        if split == "train":
            paths.append(path)
    return paths


# --- baseline: what a user writes without Ray ---------------------------------------------------


def _load(args: tuple[str, int]) -> np.ndarray:
    path, size = args
    img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def run_baseline(pool, paths: list[Path], size: int) -> int:
    n = 0
    buf = []
    for arr in pool.imap(_load, [(str(p), size) for p in paths], chunksize=16):
        buf.append(arr)
        if len(buf) == BATCH:
            n += torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).shape[0]
            buf = []
    if buf:
        n += torch.from_numpy(np.stack(buf)).permute(0, 3, 1, 2).shape[0]
    return n


# --- ours ---------------------------------------------------------------------------------------


def run_ours(root: Path, size: int, files_per_task: int | None = None) -> int:
    from hotdog_ray.config import DataSettings
    from hotdog_ray.data import ImagePipeline, iter_torch_batches

    extra = {"files_per_task": files_per_task} if files_per_task else {}
    pipeline = ImagePipeline.from_config(DataSettings(root=str(root), image_size=size, **extra))
    n = 0
    for x, _ in iter_torch_batches(
        pipeline.dataset("train", augment=False), batch_size=BATCH, rescale="unit"
    ):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, size, size)
        n += x.shape[0]
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--src", default="320x240", help="source JPEG size WxH")
    ap.add_argument("--size", type=int, default=128, help="model input size")
    ap.add_argument("--procs", type=int, default=2, help="processes for both paths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--files-per-task", type=int, default=None, help="default: the config's")
    ap.add_argument("--out", default="bench/out/ingest.json")
    args = ap.parse_args()
    src = tuple(int(v) for v in args.src.split("x"))

    from hotdog_ray.runtime import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_photos(root, args.images, src)
        init_ray(num_cpus=args.procs)
        pool = mp.get_context("fork").Pool(args.procs)
        ours, base = [], []
        run_ours(
            root, args.size, args.files_per_task
        )  # warm-up: worker processes and imports, as in any long job
        for _ in range(args.repeats):
            t = time.perf_counter()
            n = run_ours(root, args.size, args.files_per_task)
            ours.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            nb = run_baseline(pool, paths, args.size)
            base.append(nb / (time.perf_counter() - t))
            assert n == nb == len(paths), (n, nb, len(paths))
        pool.close()

    result = {
        "images": len(paths),
        "source_size": args.src,
        "input_size": args.size,
        "procs": args.procs,
        "ours_images_per_s": round(statistics.median(ours), 1),
        "baseline_images_per_s": round(statistics.median(base), 1),
        "ratio": round(statistics.median(ours) / statistics.median(base), 3),
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores, {platform.python_version()}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"ingest, {len(paths)} JPEGs {args.src} -> {args.size}px, {args.procs} processes, median of {args.repeats}"
    )
    print(f"  ray data pipeline   {result['ours_images_per_s']:>9.1f} images/s")
    print(f"  multiprocessing PIL {result['baseline_images_per_s']:>9.1f} images/s")
    print(f"  ratio               {result['ratio']:>9.3f}")


if __name__ == "__main__":
    main()
