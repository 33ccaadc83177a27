"""Training throughput: our Ray Train loop (one worker) against a plain PyTorch loop.

Both train the same zoo model with the same optimizer and batch size on the same preprocessed
images (uint8 arrays already decoded and resized, so ingest is not what is measured), with the
same number of torch threads, in one run. Images/s counts training passes only, on both sides:
our loop's per-epoch figure is the one it reports to MLflow; the baseline is timed the same way.

    python bench/train.py --model catdog_cnn --size 64 --images 2048 --epochs 4
    python bench/train.py --model first_cnn --size 120 --device cuda --mixed-precision   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_arrays(n: int, size: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed training data: uint8 NHWC images with int64 labels."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        rng.integers(0, classes, n).astype(np.int64),
    )


def bench_config(args: argparse.Namespace, storage: str):
    from hotdog_ray.config import load_config

    return load_config(
        None,
        [
            f"model.name={args.model}",
            f"data.image_size={args.size}",
            f"train.batch_size={args.batch}",
            f"train.epochs={args.epochs}",
            "train.num_workers=1",
            f"train.cpus_per_worker={args.threads}",
            f"train.use_gpu={str(args.device == 'cuda').lower()}",
            f"train.mixed_precision={str(args.mixed_precision).lower()}",
            "train.learning_rate=0.001",
            f"train.storage_path={storage}",
            "train.max_failures=0",
        ],
    )


# --- baseline: what a user writes without Ray ---------------------------------------------------


def run_baseline(cfg, x: np.ndarray, y: np.ndarray, classes: int, device: str) -> list[float]:
    """Images/s of each epoch of a plain loop over in-memory tensors."""
    from hotdog_ray.images import to_model_input
    from hotdog_ray.loop import build_optimizer
    from hotdog_ray.models import build_model, loss_fn

    torch.manual_seed(cfg.train.seed)
    dev = torch.device(device)
    model = build_model(cfg.model.name, classes, cfg.data.image_size).to(dev)
    amp = cfg.train.mixed_precision and dev.type == "cuda"
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    rates = []
    for _ in range(cfg.train.epochs):
        model.train()
        order = torch.randperm(len(images))
        t0 = time.perf_counter()
        for i in range(0, len(order), cfg.train.batch_size):
            idx = order[i : i + cfg.train.batch_size]
            xb = to_model_input(images[idx].to(dev, non_blocking=True), cfg.data.rescale)
            yb = labels[idx].to(dev, non_blocking=True)
            if dev.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xb)
            loss = loss_fn(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # our loop reads the loss every step (divergence check): same sync here
        if dev.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(order) / (time.perf_counter() - t0))
    return rates


# --- ours ---------------------------------------------------------------------------------------


def run_ours(cfg, x: np.ndarray, y: np.ndarray, classes: int) -> list[float]:
    """Images/s of each epoch as our Ray Train loop reports them."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from hotdog_ray import cache, storage
    from hotdog_ray.loop import train_loop_per_worker
    from hotdog_ray.train import scaling_config

    names = [f"c{i}" for i in range(classes)]
    where = storage.resolve(cfg.train.storage_path).join(f"bench-cache-{time.time_ns()}")
    n_val = min(len(x), 4 * cfg.train.batch_size)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "classes": names,
            # The decoded cache training reads, written straight from the arrays.
            "caches": {
                "train": cache.from_arrays(where.join("train"), x, y, names),
                "validation": cache.from_arrays(where.join("validation"), x[:n_val], y[:n_val], names),
            },
        },
        scaling_config=scaling_config(cfg.train),
        run_config=RunConfig(name=f"bench-{int(time.time())}", storage_path=cfg.train.storage_path),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    df = result.metrics_dataframe
    return [float(v) for v in df.sort_values("epoch")["images_per_s"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="catdog_cnn")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--epochs", type=int, default=4, help="per run; the first of each run is a warm-up, not counted"
    )
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each side")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads / CPUs of the Train worker, both sides"
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--mixed-precision", action="store_true", help="bf16 autocast (GPU only)")
    ap.add_argument("--out", default="bench/out/train.json")
    args = ap.parse_args()

    from hotdog_ray.runtime import init_ray

    torch.set_num_threads(args.threads)
    x, y = make_arrays(args.images, args.size, args.classes)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(args, tmp)
        init_ray()
        ours, base = [], []
        for _ in range(args.repeats):  # alternate, so drift in machine load hits both sides alike
            ours += run_ours(cfg, x, y, args.classes)[1:]
            base += run_baseline(cfg, x, y, args.classes, args.device)[1:]

    o, b = statistics.median(ours), statistics.median(base)
    result = {
        "model": args.model,
        "input_size": args.size,
        "images": args.images,
        "batch_size": args.batch,
        "epochs_counted": args.repeats * (args.epochs - 1),
        "threads": args.threads,
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "ours_images_per_s": round(o, 1),
        "baseline_images_per_s": round(b, 1),
        "ratio": round(o / b, 3),
        "ours_per_epoch": [round(v, 1) for v in ours],
        "baseline_per_epoch": [round(v, 1) for v in base],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"training, {args.model} at {args.size}px, batch {args.batch}, {args.images} images, "
        f"{args.device}{' bf16' if args.mixed_precision else ''}, {args.threads} thread(s), "
        f"median of {args.repeats} x {args.epochs - 1} epochs per side"
    )
    print(f"  ray train loop (1 worker) {o:>9.1f} images/s")
    print(f"  plain pytorch loop        {b:>9.1f} images/s")
    print(f"  ratio                     {o / b:>9.3f}")


if __name__ == "__main__":
    main()
