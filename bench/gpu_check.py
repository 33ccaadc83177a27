"""The GPU path, checked and measured in one run.

Steps, each timed, each a pass or a fail (a failed step does not stop the others):
  * steady: ``snacks_cnn`` at 224 px, bf16 and channels-last, the catdog preset's augmentation, on
    at least 10,000 photos for 5 epochs: for epochs 2 and later, train images/s against a compute-only
    loop on the same device (synthetic uint8 batches already there, the same augmentation, precision,
    memory format and batch), the GPU's busy share during those epochs, and the gap between epochs
    (report, checkpoint and the wait for the next epoch's first batch);
  * train: ``first_cnn`` at 120 px and ``snacks_cnn`` at 224 px on generated photos, fp32 against bf16
    autocast + channels-last (``train.mixed_precision``, ``train.channels_last``): images/s both ways,
    the loss falling, a checkpoint written, and the run resumed from it for one more epoch;
    nvidia-smi sampled meanwhile (GPU utilisation and memory: does ingest keep the GPU busy?);
  * two_workers: two Ray Train workers sharing the one GPU (``train.gpus_per_worker=0.5``; the ``auto``
    backend is gloo then, since NCCL refuses two ranks on one device);
  * sweep: a 3-trial Tune sweep with a third of a GPU per trial;
  * serve: the model on a GPU Serve replica and on a CPU one (off a GPU: the CPU one), each loaded by ``bench/loadgen.py`` at
    concurrency 1 and 32 (requests/s, p50, p99);
  * score: generated photos scored by a GPU actor that decodes them on its GPU (``hotdog_ray.score``,
    ``score.decode=auto``) against a one-process loop that decodes on the same GPU, and one that
    decodes on the CPU;
  * onnx: every model exported and checked; PyTorch (bf16 autocast on the GPU) against ONNX Runtime
    on the device (its CUDA provider when bench/gpu_wheels.sh ran with ORT_GPU=1), batch 1 and 16,
    and which runtime predict.runtime=auto picks.

Everything measured goes to ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` (default ``$OUT``,
the device tool's output folder, else ``bench/out/gpu_check``), rewritten after every step so that a
run cut short still reports what it measured. Exit status 1 if any step failed.

    python bench/gpu_check.py                       # on a GPU machine: the real check, under 10 minutes
    python bench/gpu_check.py --device cpu --smoke  # every step, tiny, on the CPU (tests/test_bench.py)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
log = logging.getLogger("gpu_check")
CLASSES = ("hotdog", "not_hotdog")


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the real check on a GPU, or the smoke run on a 2-core CPU."""

    models: tuple[tuple[str, int], ...]  # (model, image size)
    photo_side: int
    train_per_class: int
    val_per_class: int
    epochs: int
    batch_size: int
    train_workers: int  # 0 in the smoke run: the loop in the driver, no worker group to start per run
    sweep_trials: int
    requests: tuple[int, int]  # at concurrency 1 and 32
    score_photos: int
    score_side: int
    timing_s: float  # least time spent timing each runtime in the onnx step
    steady: tuple[str, int] = ("snacks_cnn", 224)  # the steady step's model and image size
    steady_per_class: int = 5000  # training photos per class of the steady step
    steady_epochs: int = 5


FULL = Sizes(
    models=(("first_cnn", 120), ("snacks_cnn", 224)),
    photo_side=256,
    train_per_class=640,
    val_per_class=96,
    epochs=3,
    batch_size=64,
    train_workers=1,
    sweep_trials=3,
    requests=(300, 2000),
    score_photos=30000,
    score_side=384,
    timing_s=1.0,
)
SMOKE = Sizes(
    models=(("first_cnn", 16),),
    photo_side=32,
    train_per_class=12,
    val_per_class=4,
    epochs=2,
    batch_size=8,
    train_workers=0,
    sweep_trials=2,
    requests=(10, 64),
    score_photos=40,
    score_side=48,
    timing_s=0.05,
    steady=("first_cnn", 16),
    steady_per_class=24,
    steady_epochs=3,
)


@dataclass
class Context:
    device: str  # "cuda" or "cpu"
    sizes: Sizes
    work: Path  # data, checkpoints and the MLflow store of this run
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def overrides(self, *extra: str) -> list[str]:
        """The run's base settings: generated data, a store and checkpoints under ``work``."""
        model, size = self.sizes.models[0]
        return [
            f"data.root={self.work / 'photos'}",
            f"data.image_size={size}",
            f"model.name={model}",
            f"train.batch_size={self.sizes.batch_size}",
            f"train.epochs={self.sizes.epochs}",
            f"train.num_workers={self.sizes.train_workers}",
            f"train.use_gpu={str(self.gpu).lower()}",
            "train.learning_rate=0.001",  # the presets' (0.003 made snacks_cnn spike on the H200)
            f"train.storage_path={self.work / 'checkpoints'}",
            f"tracking.uri=sqlite:///{self.work / 'mlflow.db'}",
            *extra,
        ]

    def config(self, *overrides: str):
        """The run's config: :meth:`overrides` and then ``overrides``."""
        from hotdog_ray.config import load_config

        return load_config(None, self.overrides(*overrides))


# --- generated data -----------------------------------------------------------------------------


def photo(cls: int, side: int, rng: np.random.Generator) -> bytes:
    """A smooth, photo-like JPEG whose class shows in its colour balance (learnable in an epoch)."""
    from PIL import Image

    coarse = rng.integers(0, 160, (8, 8, 3)).astype(np.int16)
    coarse[..., cls] += 90  # class 0 redder, class 1 greener
    img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_photos(root: Path, sizes: Sizes, train_per_class: int | None = None) -> None:
    """``root/{train,validation,test}/<class>/*.jpg``, seeded."""
    rng = np.random.default_rng(0)
    per_split = {
        "train": train_per_class or sizes.train_per_class,
        "validation": sizes.val_per_class,
        "test": sizes.val_per_class,
    }
    for split, n in per_split.items():
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:05d}.jpg").write_bytes(photo(c, sizes.photo_side, rng))


# --- GPU sampling ----------------------------------------------------------------------------------


class GpuSampler:
    """nvidia-smi every 200 ms in the background: utilisation (%) and memory used (MiB)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.times: list[float] = []  # when each sample arrived (time.time())
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((util, mem))
            self.times.append(time.time())

    def busy_between(self, start: float, end: float) -> float | None:
        """Mean utilisation (%) of the samples taken between ``start`` and ``end`` (time.time())."""
        inside = [u for (u, _), t in zip(self.samples, self.times) if start <= t <= end]
        return round(statistics.fmean(inside), 1) if inside else None

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=5)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"samples": 0}
        util = [u for u, _ in self.samples]
        # While a training process holds GPU memory (epochs, validation, ingest between batches), not
        # while worker groups start and runs are logged: the figure that says whether ingest keeps up.
        floor = min(m for _, m in self.samples) + 100
        held = [u for u, m in self.samples if m > floor]
        return {
            "samples": len(util),
            "util_mean_pct": round(statistics.fmean(util), 1),
            "util_mean_while_held_pct": round(statistics.fmean(held), 1) if held else None,
            "held_share": round(len(held) / len(util), 3),
            "util_max_pct": max(util),
            "mem_max_mib": max(m for _, m in self.samples),
        }


# --- steps ----------------------------------------------------------------------------------------


def _steady_images_per_s(history: list[dict[str, float]]) -> float:
    """Median images/s of the epochs after the first (the first pays for start-up and warm-up)."""
    rates = [h["images_per_s"] for h in history[1:]] or [history[0]["images_per_s"]]
    return round(statistics.median(rates), 1)


def step_steady(ctx: Context) -> dict[str, Any]:
    """Training at its steady state against a compute-only loop on the same device."""
    from hotdog_ray.config import load_config
    from hotdog_ray.train import run_training

    model, size = ctx.sizes.steady
    write_photos(ctx.work / "steady", ctx.sizes, ctx.sizes.steady_per_class)
    augment = load_config(str(HERE.parent / "configs" / "catdog.yaml")).data.augment
    cfg = ctx.config(
        f"data.root={ctx.work / 'steady'}",
        f"model.name={model}",
        f"data.image_size={size}",
        f"train.epochs={ctx.sizes.steady_epochs}",
        "train.mixed_precision=true",
        "train.channels_last=true",
        *(f"data.augment.{k}={json.dumps(v)}" for k, v in augment.model_dump(exclude_defaults=True).items()),
    )
    with GpuSampler() as sampler:
        out = run_training(cfg, run_name="steady", register=False, evaluate_test=False)
    steady = out.history[1:]
    start = steady[0]["epoch_started_at"]
    end = steady[-1]["epoch_started_at"] + steady[-1]["train_s"] + steady[-1]["validate_s"]
    train_rate = statistics.median(h["images_per_s"] for h in steady)
    steps = -(-2 * ctx.sizes.steady_per_class // cfg.train.batch_size)  # as many as an epoch
    # On the CPU a Train worker runs as many torch threads as it reserves CPUs (Ray sets
    # OMP_NUM_THREADS): the loop it is compared with gets the same.
    threads = max(1, int(cfg.train.cpus_per_worker)) if cfg.train.num_workers else None
    compute = compute_only_rate(cfg, len(CLASSES), ctx.device, steps=steps, threads=threads)
    result = {
        "model": model,
        "image_size": size,
        "train_images": 2 * ctx.sizes.steady_per_class,
        "epochs": len(out.history),
        "train_images_per_s": round(train_rate, 1),
        "compute_only_images_per_s": round(compute, 1),
        "ratio": round(train_rate / compute, 3),
        "gpu_busy_pct": sampler.busy_between(start, end),
        "gap_s": [round(h["gap_s"], 4) for h in steady],
        "validate_s": [round(h["validate_s"], 3) for h in steady],
        "epoch_images_per_s": [round(h["images_per_s"], 1) for h in out.history],
        "loss": [round(h["loss"], 4) for h in out.history],
    }
    result["aims"] = {
        "ratio>=0.8": result["ratio"] >= 0.8,
        "gpu_busy>=80%": (result["gpu_busy_pct"] or 0) >= 80,
        "gap<=50ms": max(result["gap_s"]) <= 0.05,
    }
    result["ok"] = out.history[-1]["loss"] < out.history[0]["loss"]
    return result


def compute_only_rate(cfg, classes: int, device: str, steps: int, threads: int | None = None) -> float:
    """images/s of the training step alone: synthetic uint8 batches already on ``device``, augmented,
    rescaled and cast as our feed does, through the same model, optimizer and loss check."""
    import torch

    from hotdog_ray.feed import to_model_input
    from hotdog_ray.loop import build_network, build_optimizer
    from hotdog_ray.models import loss_fn

    dev = torch.device(device)
    gpu = dev.type == "cuda"
    net = build_network(cfg, [f"c{i}" for i in range(classes)], pretrained=False).to(dev)
    net = net.to(memory_format=torch.channels_last) if gpu else net
    opt = build_optimizer(net.parameters(), cfg.train)
    size, batch = cfg.data.image_size, cfg.train.batch_size
    pool = torch.randint(0, 256, (8 * batch, size, size, 3), dtype=torch.uint8, device=dev)
    labels = torch.randint(0, classes, (8 * batch,), device=dev)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(pool), (batch,), generator=gen).to(dev)
        x = to_model_input(
            pool[idx],
            cfg.data.rescale,
            augmentation=cfg.data.augment,
            generator=gen,
            channels_last=gpu,
            dtype=torch.bfloat16 if gpu else torch.float32,
        )
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu):
            logits = net(x)
        loss = loss_fn(logits.float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # our loop reads the loss every step (divergence check)

    saved = torch.get_num_threads()
    if threads and not gpu:
        torch.set_num_threads(threads)
    try:
        for _ in range(10):  # warm-up: kernels, cuDNN autotuning, the allocator
            step()
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)


def step_train(ctx: Context) -> dict[str, Any]:
    from hotdog_ray.train import run_training

    runs, failures = [], []
    with GpuSampler() as sampler:
        for model, size in ctx.sizes.models:
            for precision in ("fp32", "bf16"):
                fast = str(precision == "bf16").lower()  # bf16 autocast and channels-last together
                cfg = ctx.config(
                    f"model.name={model}",
                    f"data.image_size={size}",
                    f"train.mixed_precision={fast}",
                    f"train.channels_last={fast}",
                )
                name = f"{model}-{precision}"
                out = run_training(cfg, run_name=name, register=False, evaluate_test=False)
                losses = [h["loss"] for h in out.history]
                row = {
                    "model": model,
                    "image_size": size,
                    "precision": precision,
                    "images_per_s": _steady_images_per_s(out.history),
                    "loss_first": round(losses[0], 4),
                    "loss_last": round(losses[-1], 4),
                    "checkpoint": out.checkpoint_path,
                }
                runs.append(row)
                if not losses[-1] < losses[0]:
                    failures.append(f"{name}: the loss did not fall ({losses})")
                if not Path(out.checkpoint_path, "state.pt").is_file():  # checkpoints go under ctx.work
                    failures.append(f"{name}: no checkpoint at {out.checkpoint_path}")
        # Resume the last run from its checkpoint for one more epoch, on the same device. A failure
        # here is one more finding: the figures above still count.
        longer = cfg.model_copy(
            update={"train": cfg.train.model_copy(update={"epochs": cfg.train.epochs + 1})}
        )
        resumed: list[int] = []
        try:
            again = run_training(longer, run_name=name, register=False, evaluate_test=False)
            resumed = [int(h["epoch"]) for h in again.history]
        except Exception as err:
            failures.append(f"{name}: resuming failed: {type(err).__name__}: {str(err)[-1500:]}")
        if resumed != list(range(cfg.train.epochs + 1)):
            failures.append(f"{name}: resumed run's epochs are {resumed}")
    # Off a GPU both settings are ignored: a ratio there would only measure warm-up and noise.
    speedups = {
        model: round(
            next(r["images_per_s"] for r in runs if r["model"] == model and r["precision"] == "bf16")
            / next(r["images_per_s"] for r in runs if r["model"] == model and r["precision"] == "fp32"),
            3,
        )
        for model, _ in ctx.sizes.models
        if ctx.gpu
    }
    gpu = sampler.summary()
    if ctx.gpu and gpu["samples"] and gpu["mem_max_mib"] < 100:
        failures.append(f"the GPU's memory never rose above {gpu['mem_max_mib']} MiB: training ran elsewhere")
    return {
        "ok": not failures,
        "failures": failures,
        "runs": runs,
        "bf16_over_fp32": speedups,
        "resumed_epochs": resumed,
        "gpu_while_training": gpu,
    }


def step_two_workers(ctx: Context) -> dict[str, Any]:
    from hotdog_ray.train import run_training

    gpu_share = ["train.gpus_per_worker=0.5"] if ctx.gpu else []
    cfg = ctx.config("train.num_workers=2", "train.cpus_per_worker=0.5", *gpu_share)
    out = run_training(cfg, run_name="two-workers", register=False, evaluate_test=False)
    losses = [h["loss"] for h in out.history]
    ok = len(out.history) == cfg.train.epochs and all(math.isfinite(v) for v in losses)
    return {
        "ok": ok,
        "backend": cfg.train.dist_backend,
        "images_per_s": _steady_images_per_s(out.history),
        "losses": [round(v, 4) for v in losses],
    }


def step_sweep(ctx: Context) -> dict[str, Any]:
    from hotdog_ray.tune import run_sweep

    n = ctx.sizes.sweep_trials
    gpu_share = [f"train.gpus_per_worker={round(1 / n, 3)}"] if ctx.gpu else []
    cfg = ctx.config(
        f"tune.num_samples={n}",
        f"tune.max_concurrent_trials={n}",
        "tune.filters=[8,16]",
        "tune.asha=false",
        "train.num_workers=1",
        "train.cpus_per_worker=0.5",
        *gpu_share,
    )
    out = run_sweep(cfg, name="gpu-sweep", promote=False)
    statuses = [t["status"] for t in out.trials]
    return {
        "ok": len(out.trials) == n and all(s == "finished" for s in statuses) and out.best is not None,
        "trials": n,
        "statuses": statuses,
        "best_val_loss": out.best and round(out.best["best_val_loss"], 4),
    }


def _register(cfg) -> str:
    """The config's model with fresh weights, registered (bench/serve.py's); its ``models:/`` reference."""
    import serve as bench_serve

    return f"models:/{cfg.tracking.registered_model}/{bench_serve.register_model(cfg)}"


def step_serve(ctx: Context) -> dict[str, Any]:
    import serve as bench_serve  # bench/serve.py: its load generator runs and its port picker
    from ray import serve

    from hotdog_ray.server.launch import deployment, wait_ready

    cfg = ctx.config("serve.reload_interval_s=0", "serve.access_log=false", "serve.cpus_per_replica=1")
    model_uri = _register(cfg)
    port = bench_serve.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    # Off a GPU the two would be the same CPU replica: measure it once.
    replicas = {"gpu replica": 1.0, "cpu replica": 0.0} if ctx.gpu else {"cpu replica": 0.0}
    c1, c32 = ctx.sizes.requests
    # bench/serve.py's measurement for every server here too: loads at 1 and 32 after an uncounted
    # burst at 32, so that each is measured warm.
    bench_args = SimpleNamespace(
        config=None, overrides=ctx.overrides(), requests_c1=c1, requests_c32=c32, settle=min(500, c32)
    )
    results: dict[str, Any] = {}
    try:
        for name, gpus in replicas.items():
            settings = cfg.serve.model_copy(update={"model_uri": model_uri, "gpus_per_replica": gpus})
            c = cfg.model_copy(update={"serve": settings})
            serve.run(deployment(c).bind(c.model_dump(mode="json")), name="gpu-check", route_prefix="/")
            if not wait_ready(url):
                raise RuntimeError(f"the {name} did not become ready")
            measured = bench_serve.measure(url, bench_args)
            results[name] = {"c1": measured[1], "c32": measured[32]}
            serve.delete("gpu-check")
    finally:
        serve.shutdown()
    # What a user writes without a serving framework, on the same device: one uvicorn process
    # running our handlers with PyTorch (bench/serve.py's baseline).
    plain = bench_serve.run_baseline(bench_args, cfg.tracking.uri, model_uri, "torch")
    results["uvicorn baseline"] = {"c1": plain[1], "c32": plain[32]}
    errors = sum(r[c]["errors"] for r in results.values() for c in ("c1", "c32"))
    out = {"ok": errors == 0, **results}
    served = results["gpu replica" if ctx.gpu else "cpu replica"]
    out["serve_over_uvicorn_rps_c32"] = round(served["c32"]["rps"] / plain[32]["rps"], 3)
    out["p50_diff_ms_c1_vs_uvicorn"] = round(served["c1"]["p50_ms"] - plain[1]["p50_ms"], 2)
    if ctx.gpu:
        gpu, cpu = results["gpu replica"], results["cpu replica"]
        out["gpu_over_cpu_rps_c32"] = round(gpu["c32"]["rps"] / cpu["c32"]["rps"], 3)
        out["p50_diff_ms_c1"] = round(gpu["c1"]["p50_ms"] - cpu["c1"]["p50_ms"], 2)
    return out


def step_score(ctx: Context) -> dict[str, Any]:
    import score as bench_score  # bench/score.py: its generator and its one-process loop

    from hotdog_ray.predict import Predictor
    from hotdog_ray.score import score

    gpus = 1 if ctx.gpu else 0
    cfg = ctx.config(f"score.gpus_per_actor={gpus}", "score.num_actors=1")
    model_uri = _register(cfg)
    folder = ctx.work / "incoming"
    bench_score.write_images(folder, ctx.sizes.score_photos, ctx.sizes.score_side)
    files = sorted(folder.iterdir())
    t0 = time.perf_counter()
    summary = score(
        cfg, input=str(folder), output=str(ctx.work / "predictions"), date="2026-11-30", model=model_uri
    )
    ours = len(files) / (time.perf_counter() - t0)
    predictor = Predictor.from_config(cfg, model_uri, device=ctx.device, runtime="torch")
    device_loop = device_decode_loop(files, predictor, cfg.score.batch_size)
    loop = bench_score.baseline(files, predictor, cfg.score.batch_size)
    return {
        "ok": summary.files == len(files) and summary.failed == 0,
        "photos": len(files),
        "side": ctx.sizes.score_side,
        "decode_on_actors": cfg.score.decode_on_actors,
        "ours_images_per_s": round(ours, 1),
        "device_decode_loop_images_per_s": round(device_loop, 1),
        "loop_images_per_s": round(loop, 1),
        "ratio": round(ours / device_loop, 3),
        "ratio_to_cpu_decode_loop": round(ours / loop, 3),
    }


def device_decode_loop(files: list[Path], predictor, batch_size: int) -> float:
    """images/s of one process that reads each batch's bytes, decodes them on the predictor's device
    and scores them there."""
    from hotdog_ray.device_decode import decode_on_device

    t0 = time.perf_counter()
    for i in range(0, len(files), batch_size):
        datas = [f.read_bytes() for f in files[i : i + batch_size]]
        images, _ = decode_on_device(
            datas, predictor.image_size, predictor.device, max_pixels=predictor.max_pixels, min_side=8
        )
        predictor.predict_tensor(images)
    return len(files) / (time.perf_counter() - t0)


def step_onnx(ctx: Context) -> dict[str, Any]:
    """Each model exported and checked, then PyTorch (bf16 on a GPU) against ONNX Runtime on the
    device, batch 1 and 16, and what ``predict.runtime=auto`` picks there."""
    import infer as bench_infer  # bench/infer.py: its timer
    import onnxruntime as ort
    import torch

    from hotdog_ray.bundle import ModelBundle
    from hotdog_ray.export import check_batch, export_onnx
    from hotdog_ray.models import build_model
    from hotdog_ray.predict import Predictor

    rows, failures = [], []
    for model_name, size in ctx.sizes.models:
        torch.manual_seed(0)
        model = build_model(model_name, 2, size).eval()
        meta = {"name": model_name, "classes": ["a", "b"], "image_size": size, "rescale": "unit"}
        exported = export_onnx(model, meta)
        if not exported.ok:
            failures.append(f"{model_name}: {exported.reason}")
            continue
        bundle = ModelBundle(model, meta, exported.model)
        eager = Predictor(bundle, device=ctx.device, runtime="torch")
        fast = Predictor(bundle, device=ctx.device, runtime="onnxruntime")
        auto = Predictor(bundle, device=ctx.device, runtime="auto")
        for n in (1, 16):
            images = check_batch(size, n, seed=1)
            diff = float(
                abs(
                    eager.predict_arrays(images).probabilities - fast.predict_arrays(images).probabilities
                ).max()
            )
            if diff > (2e-2 if ctx.gpu else 1e-4):  # bf16 against fp32 on the GPU
                failures.append(f"{model_name} batch {n}: runtimes differ by {diff:.1e}")
            torch_ms = bench_infer.per_image_ms(eager.predict_arrays, images, ctx.sizes.timing_s)
            ort_ms = bench_infer.per_image_ms(fast.predict_arrays, images, ctx.sizes.timing_s)
            rows.append(
                {
                    "model": model_name,
                    "image_size": size,
                    "batch": n,
                    "torch_ms": round(torch_ms, 3),
                    "onnxruntime_ms": round(ort_ms, 3),
                    "speedup": round(torch_ms / ort_ms, 2),
                    "max_abs_diff": diff,
                    "auto_picks": auto.runtime,
                }
            )
    return {
        "ok": not failures,
        "failures": failures,
        "providers": ort.get_available_providers(),
        "session_providers": fast.session.get_providers() if rows else [],
        "runs": rows,
    }


STEPS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "steady": step_steady,
    "train": step_train,
    "two_workers": step_two_workers,
    "sweep": step_sweep,
    "serve": step_serve,
    "score": step_score,
    "onnx": step_onnx,
}


# --- the run ---------------------------------------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import ray
    import torch

    env = {
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "cpus": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def write_report(out: Path, env: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """``gpu_check.json`` (everything) and ``gpu_check.md`` (a table of the steps)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "steps": results}, indent=2))
    lines = [
        f"GPU check on {env.get('gpu', 'CPU only')} ({env['cpus']} CPUs), torch {env['torch']}, Ray {env['ray']}",
        "",
        "| step | result | seconds | figures |",
        "|---|---|---:|---|",
    ]
    for name, r in results.items():
        verdict = "skipped" if r.get("skipped") else ("pass" if r["ok"] else "**FAIL**")
        lines.append(f"| {name} | {verdict} | {r.get('seconds', '')} | {_figures(name, r)} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _figures(name: str, r: dict[str, Any]) -> str:
    """The step's headline numbers, for the table."""
    if r.get("skipped"):
        return r["skipped"]
    if "error" in r:
        return r["error"][:200].replace("|", "/")
    if name == "train":
        rates = ", ".join(f"{x['model']} {x['precision']} {x['images_per_s']:g}/s" for x in r["runs"])
        gpu = r["gpu_while_training"]
        util = (
            f"; GPU busy {gpu['util_mean_pct']}% of the step, {gpu['util_mean_while_held_pct']}% while "
            f"a run held it (max {gpu['util_max_pct']}%)"
            if gpu["samples"]
            else ""
        )
        speedup = f"; bf16/fp32 {r['bf16_over_fp32']}" if r["bf16_over_fp32"] else ""
        resumed = f"resumed to epoch {r['resumed_epochs'][-1]}" if r["resumed_epochs"] else "NOT resumed"
        return f"{rates}{speedup}; {resumed}{util}"
    if name == "steady":
        return (
            f"{r['model']} {r['image_size']} px, {r['train_images']} photos: epochs 2+ {r['train_images_per_s']:g} "
            f"vs compute-only {r['compute_only_images_per_s']:g} images/s (x{r['ratio']}), GPU busy "
            f"{r['gpu_busy_pct']}%, gaps {max(r['gap_s']) * 1000:.0f} ms at most; aims {r['aims']}"
        )
    if name == "two_workers":
        return f"backend {r['backend']}, {r['images_per_s']:g} images/s"
    if name == "sweep":
        return f"{r['trials']} trials {r['statuses']}, best val_loss {r['best_val_loss']}"
    if name == "serve":
        rows = [
            f"{replica}: c32 {x['c32']['rps']:.0f} req/s p99 {x['c32']['p99_ms']:.1f} ms, c1 p50 {x['c1']['p50_ms']:.1f} ms"
            for replica, x in r.items()
            if replica.endswith(("replica", "baseline"))
        ]
        ratio = f"; GPU/CPU at c32 x{r['gpu_over_cpu_rps_c32']}" if "gpu_over_cpu_rps_c32" in r else ""
        return "; ".join(rows) + ratio + f"; Serve/uvicorn at c32 x{r['serve_over_uvicorn_rps_c32']}"
    if name == "score":
        return (
            f"{r['photos']} photos: {r['ours_images_per_s']:g} vs device-decode loop "
            f"{r['device_decode_loop_images_per_s']:g} images/s (x{r['ratio']}); CPU-decode loop "
            f"{r['loop_images_per_s']:g} (x{r['ratio_to_cpu_decode_loop']})"
        )
    if name == "onnx":
        where = "/".join(p.removesuffix("ExecutionProvider") for p in r["session_providers"])
        rows = ", ".join(
            f"{x['model']} b{x['batch']} torch {x['torch_ms']:g} ms vs ORT {x['onnxruntime_ms']:g} ms"
            for x in r["runs"]
        )
        return f"ORT on {where}: {rows}; auto picks {r['runs'][0]['auto_picks'] if r['runs'] else '-'}"
    return ""


def run_step(ctx: Context, name: str, env: dict[str, Any], out: Path) -> None:
    log.info("step %s", name)
    t0 = time.monotonic()
    try:
        result = STEPS[name](ctx)
    except Exception as err:  # one broken step must not hide the others' figures
        log.exception("step %s failed", name)
        result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    result["seconds"] = round(time.monotonic() - t0, 1)
    ctx.results[name] = result
    write_report(out, env, ctx.results)
    log.info("step %s: %s in %.0f s", name, "ok" if result["ok"] else "FAILED", result["seconds"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--smoke", action="store_true", help="every step tiny (seconds each on a CPU)")
    ap.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    ap.add_argument(
        "--models", nargs="+", metavar="NAME", help="only these of the check's models (a short rerun)"
    )
    ap.add_argument(
        "--steady",
        nargs=4,
        metavar=("MODEL", "SIZE", "PER_CLASS", "EPOCHS"),
        help="the steady step's model, image size, photos per class and epochs (a CPU proxy at a size "
        "a CPU finishes)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out" / "gpu_check"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)

    import torch

    env = environment(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        write_report(out, env, {"cuda": {"ok": False, "error": "torch sees no CUDA device"}})
        log.error("torch sees no CUDA device: run with --device cpu --smoke off a GPU machine")
        return 1

    from hotdog_ray.config import ServeSettings
    from hotdog_ray.runtime import init_ray
    from hotdog_ray.server.launch import set_serve_env

    set_serve_env(ServeSettings(), drain_s=1)  # read by the processes Ray starts
    init_ray()
    sizes = SMOKE if args.smoke else FULL
    if args.steady:
        model, size, per_class, epochs = args.steady
        sizes = replace(
            sizes, steady=(model, int(size)), steady_per_class=int(per_class), steady_epochs=int(epochs)
        )
    if args.models:
        sizes = replace(sizes, models=tuple(m for m in sizes.models if m[0] in args.models))
        if not sizes.models:
            ap.error(f"--models: none of {args.models} is among this run's models")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Context(args.device, sizes, Path(work))
        write_photos(ctx.work / "photos", sizes)
        for name in args.steps:
            run_step(ctx, name, env, out)
    failed = [n for n, r in ctx.results.items() if not r["ok"]]
    print((out / "gpu_check.md").read_text())
    if failed:
        log.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
