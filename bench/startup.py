"""What a process pays to start: the imports of each process kind that starts often, against the
same imports with torchvision and ONNX loaded too (what every such process loaded before the
transfer models and the export check imported them themselves).

Each row is a fresh interpreter (``python -c``), run ``--repeats`` times in turn with its
baseline so a noisy machine hits both alike; printed: the median seconds of each and their ratio
(above 1: ours starts faster).

    python bench/startup.py               # ~1 minute on 2 cores
    python bench/startup.py --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# (process kind, what it imports): a Serve replica, a Ray Train worker, the offline predictor.
KINDS = {
    "serve replica": "hotdog_ray.server.replica",
    "training worker": "hotdog_ray.loop",
    "predictor": "hotdog_ray.predict",
}
BEFORE = "torchvision, onnx"  # what those modules loaded at import before


def seconds(modules: str) -> float:
    """Wall seconds of a fresh interpreter importing ``modules``."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    seconds("hotdog_ray.server.replica")  # warm the file cache and the bytecode once, uncounted
    rows = []
    for kind, module in KINDS.items():
        ours, before = [], []
        for _ in range(args.repeats):
            ours.append(seconds(module))
            before.append(seconds(f"{BEFORE}, {module}"))
        row = {
            "process": kind,
            "imports": module,
            "ours_s": round(statistics.median(ours), 2),
            "with_torchvision_onnx_s": round(statistics.median(before), 2),
        }
        row["ratio"] = round(row["with_torchvision_onnx_s"] / row["ours_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| process | ours (s) | with torchvision + onnx (s) | ratio |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['process']} | {r['ours_s']} | {r['with_torchvision_onnx_s']} | {r['ratio']} |")


if __name__ == "__main__":
    main()
