"""CPU per request, process by process, of our Serve app under load: HAProxy as Ray sets it up
against HAProxy as ``hotdog serve`` does (``serve.haproxy_threads``, ``serve.haproxy_request_metrics``).

In one run, alternating the two settings ``--pairs`` times (this machine's speed drifts between
minutes): Ray and Serve started afresh for each, the preset's model on 2 replicas x 1 CPU behind
HAProxy, ``bench/loadgen.py`` posting ``--requests`` at concurrency 32 after a warm-up; every
process's CPU time (``/proc``) is read before and after the load. Printed: requests/s and CPU-ms a
request for the whole machine and for each process kind, and what the two HAProxy processes (HAProxy
and Ray's HAProxyManager, which parses HAProxy's per-request lines) cost in each setting.

    python bench/serve_cpu.py --config configs/hotdog.yaml --pairs 3
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import tempfile
from pathlib import Path

import serve as bench_serve  # bench/serve.py: the model registration and the load generator

# (RAY_SERVE_HAPROXY_METRICS_ENABLED, RAY_SERVE_HAPROXY_NBTHREAD) of each setting; "ours" is what
# set_serve_env gives on this machine with the defaults.
SETTINGS = {"Ray's defaults": {"metrics": "1", "threads": "4"}, "ours": None}
HAPROXY_KINDS = ("haproxy", "ray::HAProxyManager")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Every process's (kind, CPU seconds), its reaped children's included (the load generator's
    CPU lands in the driver when it exits)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
        if "ServeReplica" in cmdline:
            kind = "Serve replica"
        elif cmdline.startswith("ray::"):  # an actor's title: ray::<class>[.<method>]
            kind = cmdline.split(" ", 1)[0].split(".", 1)[0]
        else:
            kind = comm
        out[int(pid)] = (kind, sum(int(v) for v in fields[11:15]) / tick)
    return out


def per_request(before: dict, after: dict, n: int) -> dict[str, float]:
    """CPU-ms a request by process kind between two :func:`cpu_seconds` readings (pure)."""
    kinds: collections.Counter = collections.Counter()
    for pid, (kind, seconds) in after.items():
        kinds[kind] += seconds - before.get(pid, (kind, 0.0))[1]
    return {kind: round(1000 * s / n, 3) for kind, s in kinds.most_common() if s > 0.005}


def measure(cfg, env: dict[str, str], requests: int) -> dict:
    import ray
    from ray import serve

    from hotdog_ray.server.launch import (
        HAPROXY_METRICS_ENV,
        HAPROXY_THREADS_ENV,
        deployment,
        set_serve_env,
        wait_ready,
    )

    saved = dict(os.environ)
    os.environ.pop(HAPROXY_METRICS_ENV, None)
    os.environ.pop(HAPROXY_THREADS_ENV, None)
    if env:
        os.environ.update({HAPROXY_METRICS_ENV: env["metrics"], HAPROXY_THREADS_ENV: env["threads"]})
    set_serve_env(cfg.serve, drain_s=1)
    used = {k: os.environ[k] for k in (HAPROXY_METRICS_ENV, HAPROXY_THREADS_ENV)}
    try:
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False)
        port = bench_serve.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        serve.run(deployment(cfg).bind(cfg.model_dump(mode="json")), name="bench", route_prefix="/")
        if not wait_ready(url):
            raise RuntimeError("the app did not become ready")
        bench_serve.load(url, 32, 300)  # warm-up
        before = cpu_seconds()
        stats = bench_serve.load(url, 32, requests)
        after = cpu_seconds()
        serve.shutdown()
        ray.shutdown()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    kinds = per_request(before, after, stats["ok"] + stats["warmup"])
    return {
        "env": used,
        "rps": stats["rps"],
        "errors": stats["errors"],
        "cpu_ms": round(sum(kinds.values()), 3),
        "haproxy_ms": round(sum(kinds.get(k, 0.0) for k in HAPROXY_KINDS), 3),
        "kinds": kinds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/hotdog.yaml")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--out", default="bench/out/serve_cpu.json")
    args = ap.parse_args()

    from hotdog_ray.config import load_config
    from hotdog_ray.registry import set_alias

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", "serve.reload_interval_s=0"]
        overrides += [
            "serve.access_log=false",
            "serve.autoscaling.min_replicas=2",
            "serve.autoscaling.max_replicas=2",
        ]
        cfg = load_config(args.config, overrides)
        set_alias(cfg.tracking, bench_serve.register_model(cfg))
        for pair in range(args.pairs):
            for name, env in SETTINGS.items():
                runs.append({"pair": pair + 1, "setting": name, **measure(cfg, env, args.requests)})
                print(json.dumps(runs[-1]), flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "runs": runs})
    )
    print(
        f"\n{cfg.model.name} at {cfg.data.image_size} px, 2 replicas x 1 CPU, concurrency 32, {platform.machine()}"
    )
    print(
        f"  {'pair':>4}  {'setting':<16}{'HAProxy env':>14}{'req/s':>8}{'CPU ms/req':>12}{'HAProxy ms/req':>16}"
    )
    for r in runs:
        env = f"{r['env']['RAY_SERVE_HAPROXY_METRICS_ENABLED']}/{r['env']['RAY_SERVE_HAPROXY_NBTHREAD']}"
        print(
            f"  {r['pair']:>4}  {r['setting']:<16}{env:>14}{r['rps']:>8.1f}{r['cpu_ms']:>12.3f}{r['haproxy_ms']:>16.3f}"
        )
    for pair in range(1, args.pairs + 1):
        ray_default, ours = (r for r in runs if r["pair"] == pair)
        print(
            f"  pair {pair}: HAProxy and its parser save {ray_default['haproxy_ms'] - ours['haproxy_ms']:.3f} ms a request"
        )


if __name__ == "__main__":
    main()
