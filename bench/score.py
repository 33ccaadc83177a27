"""Batch scoring throughput and memory: our Ray Data job against a single-process loop.

In one run, over the same generated files and the same model: ``hotdog_ray.score.score`` (read
bytes, decode in parallel tasks, model in an actor pool, Parquet out) against the loop a user
would write otherwise (read, decode and preprocess with the same predictor, batched forward in
eager PyTorch, one process; run before and after the job, and averaged); the job runs
``predict.runtime`` (default: ONNX Runtime on the CPU). Printed: images/s of each
and their ratio, and the peak memory of all processes on the machine above what was in use before
(sampled every 0.2 s) for the job at each input size, to show it stays flat as inputs grow. The job's
model carries a full out-of-distribution bank, as a trained one has; at the first size the job also
runs ``--ood`` rounds with the flag on and off (the same weights without the bank), alternating.

    python bench/score.py --sizes 5000 50000                                        # small images
    python bench/score.py --config configs/hotdog.yaml --side 384 --sizes 2000 10000  # photos, 120 px model
    python bench/score.py --config configs/hotdog.yaml --side 2048 --sizes 5000       # camera-sized photos
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_bank import full_bank_meta  # noqa: E402 - the bench folder is not a package


def write_images(folder: Path, n: int, side: int = 48) -> None:
    """``n`` JPEGs, each a shifted copy of one random image; above 64 px a smooth, photo-like one
    (pure noise would make every file as large as its pixels)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if side <= 64:
        base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    else:
        coarse = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize(
            (side, side), Image.BICUBIC
        )
        grain = rng.integers(-8, 8, (side, side, 3))
        base = np.clip(np.asarray(coarse, np.int16) + grain, 0, 255).astype(np.uint8)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.roll(base, i, axis=1)).save(buf, "JPEG", quality=90)
        (folder / f"img_{i:06d}.jpg").write_bytes(buf.getvalue())


class PeakMemory:
    """Peak of the machine's used memory above its level at start, sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.start = psutil.virtual_memory().used
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._psutil.virtual_memory().used - self.start)
            time.sleep(0.2)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def baseline(files: list[Path], predictor, batch_size: int) -> float:
    """images/s of the single-process loop."""
    t0 = time.perf_counter()
    for i in range(0, len(files), batch_size):
        arrays = [predictor.preprocess(f.read_bytes()) for f in files[i : i + batch_size]]
        predictor.predict_arrays(np.stack(arrays))
    return len(files) / (time.perf_counter() - t0)


def stage_costs(files: list[Path], predictor, batch_size: int) -> dict[str, float]:
    """ms per image of the loop's two stages: decode + preprocess, and the batched forward pass on
    one and on two PyTorch threads (what bounds any speed-up from parallel scoring on this machine)."""
    import torch

    sample = files[:200]
    t0 = time.perf_counter()
    batch = np.stack([predictor.preprocess(f.read_bytes()) for f in sample])
    costs = {"decode_ms": 1000 * (time.perf_counter() - t0) / len(sample)}
    batch = batch[:batch_size]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            predictor.predict_arrays(batch)  # warm-up
            t0 = time.perf_counter()
            for _ in range(5):
                predictor.predict_arrays(batch)
            costs[f"forward_ms_{n}_threads"] = 1000 * (time.perf_counter() - t0) / (5 * len(batch))
    finally:
        torch.set_num_threads(threads)
    return {k: round(v, 2) for k, v in costs.items()}


def flag_on_and_off(cfg, folder: Path, n: int, versions: dict[str, str], out: str, rounds: int) -> dict:
    """The job on the same files with the OOD flag on (a model with a full bank) and off (the same
    weights without one), alternating which goes first, ``rounds`` times each."""
    from hotdog_ray.score import score

    rates: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(rounds):
        for flag in ("on", "off") if i % 2 == 0 else ("off", "on"):
            model = f"models:/{cfg.tracking.registered_model}/{versions[flag]}"
            t0 = time.perf_counter()
            summary = score(cfg, input=str(folder), output=f"{out}-{flag}", date="2026-11-23", model=model)
            rates[flag].append(n / (time.perf_counter() - t0))
            assert summary.files == n and summary.failed == 0
    ratios = [round(a / b, 3) for a, b in zip(rates["on"], rates["off"])]
    return {
        "images": n,
        "rounds": rounds,
        "on_images_per_s": round(statistics.median(rates["on"]), 1),
        "off_images_per_s": round(statistics.median(rates["off"]), 1),
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sample.yaml")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--side", type=int, default=48, help="side of the generated JPEGs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--ood",
        type=int,
        default=3,
        metavar="ROUNDS",
        help="rounds of the OOD flag on/off runs at the first size (0: none)",
    )
    ap.add_argument("--out", default="bench/out/score.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from hotdog_ray import model_store, registry, tracking
    from hotdog_ray.bundle import model_meta
    from hotdog_ray.config import load_config
    from hotdog_ray.models import build_model
    from hotdog_ray.predict import Predictor
    from hotdog_ray.runtime import init_ray
    from hotdog_ray.score import score

    rows, ood_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"tracking.uri=sqlite:///{tmp}/mlflow.db", *args.overrides])
        torch.manual_seed(0)
        classes = ["hotdog", "not_hotdog"]
        model = build_model(cfg.model.name, 2, cfg.data.image_size, filters=cfg.model.filters).eval()
        # The job's model carries a full OOD bank; the same weights without one run the flag-off side.
        meta, bank = full_bank_meta(model, model_meta(cfg, classes))
        versions = {}
        for flag, (m, b) in {"on": (meta, bank), "off": (model_meta(cfg, classes), None)}.items():
            with tracking.run(cfg.tracking, name=f"bench-score-ood-{flag}") as run:
                model_store.log_model(run, model, m, b)
            versions[flag] = model_store.register(cfg.tracking, run.id)
        registry.set_alias(cfg.tracking, versions["on"])
        init_ray()
        for n in args.sizes:
            folder = Path(tmp) / f"in-{n}"
            write_images(folder, n, args.side)
            files = sorted(folder.iterdir())
            # The loop a user writes: eager PyTorch on all cores (our job runs predict.runtime).
            predictor = Predictor.from_config(cfg, device="cpu", runtime="torch")
            # The loop before and after the job: this machine's speed drifts between minutes, and the
            # mean of both brackets the job's run.
            before = baseline(files, predictor, cfg.score.batch_size)
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                summary = score(cfg, input=str(folder), output=f"{tmp}/out-{n}", date="2026-11-23")
                ours = n / (time.perf_counter() - t0)
            assert summary.files == n and summary.failed == 0
            after = baseline(files, predictor, cfg.score.batch_size)
            base = (before + after) / 2
            if args.ood and n == args.sizes[0]:
                ood_rows.append(flag_on_and_off(cfg, folder, n, versions, f"{tmp}/ood-{n}", args.ood))
            rows.append(
                {
                    "images": n,
                    "ours_images_per_s": round(ours, 1),
                    "baseline_images_per_s": round(base, 1),
                    "baseline_before_after": [round(before, 1), round(after, 1)],
                    "ratio": round(ours / base, 3),
                    "peak_memory_mib": round(mem.peak / 2**20),
                }
            )
        costs = stage_costs(files, predictor, cfg.score.batch_size)
    result = {
        "config": args.config,
        "model": cfg.model.name,
        "image_size": cfg.data.image_size,
        "jpeg_side": args.side,
        "num_actors": summary.actors,
        "cpus_per_actor": cfg.score.cpus_per_actor,
        "batch_size": cfg.score.batch_size,
        "rows": rows,
        "ood_flag": ood_rows,
        "stage_costs": costs,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{cfg.model.name} at {cfg.data.image_size} px, {args.side}x{args.side} JPEGs, {result['machine']}")
    print(
        f"  {'images':>8}{'ours img/s':>12}{'loop img/s':>12}{'ratio':>8}{'peak MiB (ours)':>17}  loop before/after"
    )
    for r in rows:
        print(
            f"  {r['images']:>8}{r['ours_images_per_s']:>12.1f}{r['baseline_images_per_s']:>12.1f}"
            f"{r['ratio']:>8.3f}{r['peak_memory_mib']:>17}  {r['baseline_before_after']}"
        )
    print(
        f"  loop stages, ms per image: decode {costs['decode_ms']}, forward {costs['forward_ms_1_threads']} "
        f"on 1 thread / {costs['forward_ms_2_threads']} on 2"
    )
    for r in ood_rows:
        print(
            f"  OOD flag, {r['images']} images, {r['rounds']} rounds each: on {r['on_images_per_s']} img/s, "
            f"off {r['off_images_per_s']} img/s, on / off {r['ratio']} (rounds {r['round_ratios']})"
        )


if __name__ == "__main__":
    main()
