"""Forward-pass time per image of every zoo model: eager PyTorch against ONNX Runtime.

In one run, one thread each (what a Serve replica or scoring actor with one CPU gets), every zoo
model at its recipe's input size (configs/), batch 1 and 16, random weights, the same uint8
images in: eager PyTorch (``predict.runtime=torch``), ONNX Runtime on the exported graph
(``predict.runtime=onnxruntime``) and, for reference, ``torch.compile``. Printed: ms per image
and the ratios eager/ONNX Runtime and eager/compile (above 1: faster than eager). The models carry
a full out-of-distribution bank, as trained ones do; ONNX Runtime also runs the graph without it,
and the ratio with/without is what the OOD flag costs the forward pass.

    python bench/infer.py                     # every model, ~5 minutes on 2 cores
    python bench/infer.py --models first_cnn --no-compile
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from hotdog_ray.bundle import ModelBundle
from hotdog_ray.export import InferenceGraph, check_batch, export_onnx
from hotdog_ray.models import build_model
from hotdog_ray.predict import Predictor
from hotdog_ray.zoo import ZOO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood_bank import full_bank_meta  # noqa: E402 - the bench folder is not a package

# The recipes' input sizes (configs/*.yaml); resnet18 has no recipe and takes ImageNet's 224.
RECIPE_SIZE = {
    "first_cnn": 120,
    "catdog_cnn": 150,
    "food_cnn": 128,
    "snacks_cnn": 224,
    "vgg16": 150,
    "resnet18": 224,
}


def per_image_ms(fn, images: np.ndarray, min_seconds: float, min_runs: int = 3) -> float:
    """Best of repeated timed runs (after a warm-up), in ms per image: the least disturbed run."""
    fn(images)
    best, runs, t_end = float("inf"), 0, time.perf_counter() + min_seconds
    while runs < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn(images)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best * 1000 / len(images)


def bench_model(name: str, size: int, batches: list[int], args) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(name, 2, size).eval()
    plain = {"name": name, "classes": ["a", "b"], "image_size": size, "rescale": "unit"}
    meta, bank = full_bank_meta(model, plain)
    exported, without = export_onnx(model, meta, bank), export_onnx(model, plain)
    if not (exported.ok and without.ok):
        raise RuntimeError(f"{name}: {exported.reason or without.reason}")
    bundle = ModelBundle(model, meta, exported.model, bank)
    eager = Predictor(bundle, device="cpu", runtime="torch", threads=1)
    ort = Predictor(bundle, device="cpu", runtime="onnxruntime", threads=1)
    no_ood = Predictor(
        ModelBundle(model, plain, without.model), device="cpu", runtime="onnxruntime", threads=1
    )
    compiled = None
    if args.compile:
        graph = InferenceGraph(model, "unit").eval()
        compiled_graph = torch.compile(graph)

        def compiled(images: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return compiled_graph(torch.from_numpy(images))[0].numpy()

    rows = []
    for n in batches:
        images = check_batch(size, n, seed=1)
        # Same answers: the comparison is between equal computations.
        assert (
            np.abs(
                eager.predict_arrays(images).probabilities - ort.predict_arrays(images).probabilities
            ).max()
            <= 1e-4
        )
        row = {
            "model": name,
            "size": size,
            "batch": n,
            "torch_ms": per_image_ms(eager.predict_arrays, images, args.seconds),
            "onnxruntime_ms": per_image_ms(ort.predict_arrays, images, args.seconds),
        }
        row["onnxruntime_speedup"] = row["torch_ms"] / row["onnxruntime_ms"]
        row["onnxruntime_no_ood_ms"] = per_image_ms(no_ood.predict_arrays, images, args.seconds)
        row["ood_cost"] = row["onnxruntime_ms"] / row["onnxruntime_no_ood_ms"]
        if compiled is not None:
            row["compile_ms"] = per_image_ms(compiled, images, args.seconds)
            row["compile_speedup"] = row["torch_ms"] / row["compile_ms"]
        logging.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--seconds", type=float, default=2.0, help="least time spent timing each cell")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("hotdog_ray").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    rows = [row for name in args.models for row in bench_model(name, RECIPE_SIZE[name], args.batches, args)]
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread\n")
    head = (
        f"{'model':<12}{'px':>5}{'batch':>6}{'eager ms':>10}{'ORT ms':>9}{'eager/ORT':>10}"
        f"{'ORT no OOD':>11}{'OOD cost':>9}"
    )
    print(head + (f"{'compile ms':>11}{'eager/compile':>14}" if args.compile else ""))
    for r in rows:
        line = (
            f"{r['model']:<12}{r['size']:>5}{r['batch']:>6}{r['torch_ms']:>10.2f}"
            f"{r['onnxruntime_ms']:>9.2f}{r['onnxruntime_speedup']:>9.2f}x"
            f"{r['onnxruntime_no_ood_ms']:>11.2f}{r['ood_cost']:>8.3f}x"
        )
        if "compile_ms" in r:
            line += f"{r['compile_ms']:>11.2f}{r['compile_speedup']:>13.2f}x"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
