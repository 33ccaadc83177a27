"""Online serving throughput and latency: our Ray Serve app against one plain uvicorn process.

In one run, on loopback, with the same model and the same FastAPI handlers (``create_api``):
  * ours: ``hotdog_ray.server`` on Ray Serve, with dynamic batching, and again without it
    (``serve.max_batch_size=1``): HTTP enters through HAProxy (``serve.haproxy``, or Serve's Python
    proxy with ``--ingress proxy``), one replica per core by default (``--replicas``);
  * baseline: what a user would write otherwise, one ``uvicorn`` process running the handlers with
    a direct forward pass per request in eager PyTorch, no Ray; and the same process on ONNX Runtime,
    to show what Ray Serve adds on top of a fast runtime. Both run before and after the Serve rows,
    and the Serve rows are compared with the mean of the two.
Serve replicas run ``predict.runtime`` (default auto: ONNX Runtime on the CPU) on a model with a full
out-of-distribution bank, as a trained one has. Three more Serve rows: the same weights without the
bank (the OOD flag off), a shadow rollout (a challenger scores every request too) and the prediction
log at rate 1.0 (every answer written as Parquet); the batching row is compared with the first, the
other two with the batching row.
Each is loaded by ``bench/loadgen.py`` in its own process at concurrency 1 and 32, after an
uncounted burst at 32 (``--settle``) so that every server is measured warm. Printed:
requests/s, p50 and p99 latency, the throughput ratio at 32 and the p50 difference at 1. With
``--repeats N`` the Serve rows run N rounds, one after the other in each and each round starting
one row later, and each ratio is the median of the rounds' (this machine's speed drifts between
minutes; rows measured side by side in one round compare, rows minutes apart less so).

    python bench/serve.py --config configs/sample.yaml
    python bench/serve.py --config configs/sample.yaml --ingress proxy --replicas 1   # the old path
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from ood_bank import full_bank_meta  # noqa: E402 - the bench folder is not a package


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, concurrency: int, n: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "loadgen.py"),
            url + "/predict",
            "--requests",
            str(n),
            "--concurrency",
            str(concurrency),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if not out.stdout.strip():
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout)


def measure(url: str, args) -> dict:
    """Loads at concurrency 1 and 32, after a burst at 32 that is not counted: every server, ours
    and the baselines, is measured warm (a Serve app's first seconds after its deployment also
    share the cores with Serve's controller and the previous app's replicas going away)."""
    settle = load(url, 32, args.settle) if args.settle else {"ok": 0, "warmup": 0}
    out = {1: load(url, 1, args.requests_c1), 32: load(url, 32, args.requests_c32)}
    out[1]["settle"] = settle["ok"] + settle["warmup"]  # answered before the counted loads
    return out


def mean_of(before: dict, after: dict) -> dict:
    """A baseline measured before and after the Serve rows: the mean throughput and p50 at each
    concurrency (pure)."""
    return {c: {k: (before[c][k] + after[c][k]) / 2 for k in ("rps", "p50_ms")} for c in before if c in after}


def register_model(cfg, seed: int = 0, ood: bool = True) -> str:
    """The preset's architecture with fresh weights, registered: speed does not depend on the weights.
    ``ood``: with a full out-of-distribution bank, as a trained model has (without: the flag off)."""
    import torch

    from hotdog_ray import model_store, tracking
    from hotdog_ray.bundle import model_meta
    from hotdog_ray.models import build_model

    torch.manual_seed(seed)
    classes = ["hotdog", "not_hotdog"]
    model = build_model(
        cfg.model.name,
        len(classes),
        cfg.data.image_size,
        filters=cfg.model.filters,
        dropout=cfg.model.dropout,
    ).eval()
    meta, bank = full_bank_meta(model, model_meta(cfg, classes)) if ood else (model_meta(cfg, classes), None)
    with tracking.run(cfg.tracking, name="bench-serve") as run:
        model_store.log_model(run, model, meta, bank)
    return model_store.register(cfg.tracking, run.id)


def run_baseline(args, db: str, model_uri: str, runtime: str) -> dict:
    """bench/serve_baseline.py in one uvicorn process on ``runtime``, loaded at concurrency 1 and 32."""
    from hotdog_ray.server.launch import wait_ready

    port = free_port()
    overrides = [
        f"tracking.uri={db}",
        *args.overrides,
        f"predict.runtime={runtime}",
        f"serve.cpus_per_replica={os.cpu_count()}",
    ]
    env = {
        **os.environ,
        "HOTDOG_BENCH_CONFIG": args.config or "",
        "HOTDOG_BENCH_MODEL": model_uri,
        "HOTDOG_BENCH_SET": "\n".join(overrides),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "--app-dir", str(HERE), "serve_baseline:app"]
        + ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=REPO,
    )
    try:
        if not wait_ready(f"http://127.0.0.1:{port}", alive=lambda: server.poll() is None):
            raise RuntimeError(f"the {runtime} baseline server did not start")
        return measure(f"http://127.0.0.1:{port}", args)
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sample.yaml")
    ap.add_argument("--requests-c1", type=int, default=400)
    ap.add_argument("--requests-c32", type=int, default=3000)
    ap.add_argument(
        "--settle", type=int, default=500, help="uncounted requests at 32 before each server's loads"
    )
    ap.add_argument(
        "--ingress",
        choices=["haproxy", "proxy"],
        default="haproxy",
        help="HTTP into Serve: HAProxy straight to the replicas, or Serve's Python proxy",
    )
    ap.add_argument(
        "--replicas",
        type=int,
        default=os.cpu_count(),
        help="Serve replicas (serve.autoscaling.min/max_replicas); the baseline is always one process",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="rounds of the Serve rows; ratios are the rounds' median"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="bench/out/serve.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hotdog_ray.config import load_config
    from hotdog_ray.server.launch import wait_ready

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/mlflow.db"
        # No access log line per request, as the baseline's uvicorn runs with --log-level warning.
        cfg = load_config(
            args.config,
            [
                f"tracking.uri={db}",
                "serve.reload_interval_s=0",
                f"rollout.store={tmp}/rollout",
                "serve.access_log=false",
                f"serve.autoscaling.min_replicas={args.replicas}",
                f"serve.autoscaling.max_replicas={args.replicas}",
                f"serve.haproxy={str(args.ingress == 'haproxy').lower()}",
                *args.overrides,
            ],
        )
        version = register_model(cfg)
        model_uri = f"models:/{cfg.tracking.registered_model}/{version}"
        no_ood_uri = f"models:/{cfg.tracking.registered_model}/{register_model(cfg, ood=False)}"

        # Baselines alone on the machine (no Ray), before and after the Serve rows, which are compared
        # with the mean of the two (the machine's speed drifts over a run): one uvicorn process, the
        # same handlers, the runtime's own threads (one per core), as a hand-written server would.
        baselines = (("uvicorn + PyTorch", "torch"), ("uvicorn + ONNX Runtime", "onnxruntime"))
        for name, runtime in baselines:
            results[f"{name} (before)"] = run_baseline(args, db, model_uri, runtime)

        import ray
        from ray import serve

        from hotdog_ray.server.launch import deployment, set_serve_env

        # The bench deletes its app between runs: no need to drain for long.
        set_serve_env(cfg.serve, drain_s=1)
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        # Shadow: the challenger (the same architecture, other weights) also scores every request.
        from hotdog_ray.promote import set_challenger
        from hotdog_ray.registry import set_alias

        set_alias(cfg.tracking, version)
        set_challenger(cfg, register_model(cfg, seed=1))
        log_root = f"{tmp}/prediction-log"
        runs = (
            ("Ray Serve, batching", cfg.serve.max_batch_size, "off", None),
            # The same weights without the OOD bank: what the out-of-distribution flag costs.
            ("Ray Serve, no OOD score", cfg.serve.max_batch_size, "no-ood", None),
            ("Ray Serve, no batching", 1, "off", None),
            ("Ray Serve, shadow", cfg.serve.max_batch_size, "shadow", None),
            # Every answer logged (rate 1.0): what the prediction log costs a replica.
            ("Ray Serve, prediction log", cfg.serve.max_batch_size, "off", log_root),
        )
        rounds: list[dict[str, dict]] = []
        for i in range(args.repeats):
            rounds.append({})
            # Each round starts one row later: no row is always measured first (after Ray's start,
            # or right after the previous app was deleted).
            for name, batch, mode, location in runs[i % len(runs) :] + runs[: i % len(runs)]:
                uri = {"off": model_uri, "no-ood": no_ood_uri}.get(mode)  # None: the rollout's aliases
                update = {"model_uri": uri, "max_batch_size": batch}
                c = cfg.model_copy(
                    update={
                        "serve": cfg.serve.model_copy(update=update),
                        "rollout": cfg.rollout.model_copy(
                            update={"mode": "off" if mode == "no-ood" else mode}
                        ),
                        "prediction_log": cfg.prediction_log.model_copy(
                            update={"location": location, "sample_rate": 1.0}
                        ),
                    }
                )
                serve.run(deployment(c).bind(c.model_dump(mode="json")), name="bench", route_prefix="/")
                if not wait_ready(url):
                    raise RuntimeError(f"{name} did not become ready")
                rounds[-1][name] = measure(url, args)
                serve.delete("bench")
        serve.shutdown()
        ray.shutdown()
        for name, runtime in baselines:
            results[f"{name} (after)"] = run_baseline(args, db, model_uri, runtime)
        from hotdog_ray import predlog

        logged_rows = predlog.read(log_root).num_rows  # every answer, the last ones at shutdown

    base, fast = (mean_of(results[f"{name} (before)"], results[f"{name} (after)"]) for name, _ in baselines)

    def other(rd: dict, versus: str | dict) -> dict:
        return rd[versus] if isinstance(versus, str) else versus  # a row of the round, or a baseline

    def ratios(row: str, versus: str | dict) -> list[float]:
        """``row``'s throughput at 32 over ``versus``'s, in every round."""
        return [round(rd[row][32]["rps"] / other(rd, versus)[32]["rps"], 3) for rd in rounds]

    def p50_diffs(row: str, versus: str | dict) -> list[float]:
        """``row``'s p50 at 1 less ``versus``'s, in every round."""
        return [round(rd[row][1]["p50_ms"] - other(rd, versus)[1]["p50_ms"], 2) for rd in rounds]

    serve_row, shadow_row, log_row = "Ray Serve, batching", "Ray Serve, shadow", "Ray Serve, prediction log"
    figures = {
        "throughput_ratio_c32": ratios(serve_row, base),
        "p50_diff_ms_c1": p50_diffs(serve_row, base),
        "throughput_ratio_c32_vs_onnxruntime": ratios(serve_row, fast),
        "shadow_throughput_ratio_c32": ratios(shadow_row, serve_row),
        "shadow_p50_diff_ms_c1": p50_diffs(shadow_row, serve_row),
        "log_throughput_ratio_c32": ratios(log_row, serve_row),
        "log_p50_diff_ms_c1": p50_diffs(log_row, serve_row),
        "ood_throughput_ratio_c32": ratios(serve_row, "Ray Serve, no OOD score"),
        "ood_p50_diff_ms_c1": p50_diffs(serve_row, "Ray Serve, no OOD score"),
    }
    for i, rd in enumerate(rounds):  # every round's rows in the table
        for name, r in rd.items():
            results[name if len(rounds) == 1 else f"{name} #{i + 1}"] = r
    summary = {
        "config": args.config,
        "model": cfg.model.name,
        "image_size": cfg.data.image_size,
        "max_batch_size": cfg.serve.max_batch_size,
        "batch_wait_timeout_s": cfg.serve.batch_wait_timeout_s,
        "ingress": args.ingress,
        "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED"),
        "replicas": cfg.serve.autoscaling.max_replicas,
        "cpus_per_replica": cfg.serve.cpus_per_replica,
        "repeats": args.repeats,
        "results": {k: {str(c): v for c, v in r.items()} for k, r in results.items()},
        "runtime": cfg.predict.runtime,
        **{key: statistics.median(values) for key, values in figures.items()},
        "rounds": figures,
        "log_rows": logged_rows,
        "log_requests_ok": sum(
            rd[log_row][c]["ok"] + rd[log_row][c].get("warmup", 0) + rd[log_row][c].get("settle", 0)
            for rd in rounds
            for c in (1, 32)
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"{cfg.model.name} at {cfg.data.image_size} px, 64x48 JPEG posts, loopback ({summary['machine']})")
    print(
        f"  Serve: {args.ingress} ingress, {cfg.serve.autoscaling.max_replicas} replica(s) x {cfg.serve.cpus_per_replica} CPU, "
        f"batches of up to {cfg.serve.max_batch_size}, wait {cfg.serve.batch_wait_timeout_s * 1000:g} ms"
    )
    print(f"  {'server':<30}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, r in results.items():
        for c, s in r.items():
            print(f"  {name:<30}{c:>5}{s['rps']:>9.1f}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}{s['errors']:>8}")

    def said(key: str, unit: str = "") -> str:
        """The figure (the rounds' median), and every round's when there are several."""
        sign, values = ("+" if unit else ""), figures[key]
        text = f"{summary[key]:{sign}.{2 if unit else 3}f}{unit}"
        if len(values) > 1:
            text += " (median of " + ", ".join(f"{v:{sign}g}" for v in values) + ")"
        return text

    print(f"  throughput ratio at 32 (Serve batching / uvicorn + PyTorch): {said('throughput_ratio_c32')}")
    print(f"  p50 difference at 1 (Serve batching - uvicorn + PyTorch):   {said('p50_diff_ms_c1', ' ms')}")
    print(
        "  throughput ratio at 32 (Serve batching / uvicorn + ONNX Runtime): "
        f"{said('throughput_ratio_c32_vs_onnxruntime')}"
    )
    print(f"  OOD flag at 32 (with / without the bank): {said('ood_throughput_ratio_c32')}")
    print(f"  OOD flag p50 at 1 (with - without): {said('ood_p50_diff_ms_c1', ' ms')}")
    print(f"  shadow rollout at 32 (shadow / off): {said('shadow_throughput_ratio_c32')}")
    print(f"  shadow rollout p50 at 1 (shadow - off): {said('shadow_p50_diff_ms_c1', ' ms')}")
    print(
        f"  prediction log at 32 (logged / off): {said('log_throughput_ratio_c32')}; p50 at 1: "
        f"{said('log_p50_diff_ms_c1', ' ms')}; {summary['log_rows']} rows for {summary['log_requests_ok']} "
        "answers (warm-ups and settling included)"
    )


if __name__ == "__main__":
    main()
