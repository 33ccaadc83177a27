"""One full turn of the closed loop on the digits sample, step by step (wall seconds each).

The steps a production loop goes through, with this repository's code and nothing mocked: train the
champion (the Quickstart job, ``configs/sample.yaml``), serve it on Ray Serve with a shadow rollout
and the prediction log keeping images, clients answer-and-label inverted digits over HTTP, then
``hotdog_ray.retrain.retrain`` (triggers, export, fine-tune, register, challenger), shadow traffic
until ``loop.min_live_requests``, and ``hotdog_ray.feedback_loop.run_loop`` (the gate and the
promotion), and finally the time until every answer comes from the new version. There is no
baseline to divide by: a person carrying each result to the next step is not a program. Printed:
seconds per step and in all, the champion's and the candidate's accuracy on held-out inverted
digits, and the gate's decision (a refused candidate is a result too; the bench then moves the
alias by hand, as ``hotdog promote --force`` would, to time the swap all the same).

    python bench/loop.py                       # ~5 minutes on 2 cores
    python bench/loop.py --champion-epochs 10 --labels 300 --shadow 200
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def inverted(path: Path) -> bytes:
    """A digit as a negative: dark strokes on white, a distribution the sample never had."""
    buf = io.BytesIO()
    Image.fromarray(255 - np.asarray(Image.open(path).convert("L"))).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accuracy(predictor, files: list[Path]) -> float:
    return float(np.mean([predictor.predict(inverted(f)).label == f.parent.name for f in files]))


class Clients:
    """Threads posting inverted digits to /predict until stopped; every status seen."""

    def __init__(self, url: str, images: list[bytes], count: int = 2) -> None:
        self.url, self.images, self.statuses = url, images, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(count)]
        for t in self._threads:
            t.start()

    def _run(self, offset: int) -> None:
        with requests.Session() as http:
            i = offset
            while not self._stop.is_set():
                r = http.post(self.url, data=self.images[i % len(self.images)], timeout=60)
                self.statuses.append(r.status_code)
                i += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--champion-epochs", type=int, default=30, help="the sample preset's 30")
    ap.add_argument("--labels", type=int, default=210, help="labelled inverted digits sent as feedback")
    ap.add_argument("--shadow", type=int, default=200, help="loop.min_live_requests")
    ap.add_argument("--retrain-epochs", type=int, default=5, help="loop.epochs")
    ap.add_argument("--out", default="bench/out/loop.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray
    from ray import serve

    from hotdog_ray import feedback, feedback_loop, registry, retrain, rollout
    from hotdog_ray.config import load_config
    from hotdog_ray.predict import Predictor
    from hotdog_ray.prepare import write_sample
    from hotdog_ray.server.launch import deployment, set_serve_env, wait_ready
    from hotdog_ray.train import run_training

    steps: dict[str, float] = {}

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        steps[name] = round(time.perf_counter() - t0, 1)
        print(f"  {name:<44}{steps[name]:>8.1f} s", flush=True)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_sample(str(root / "data"))
        port = free_port()
        cfg = load_config(
            REPO / "configs" / "sample.yaml",
            [
                f"data.root={root / 'data'}",
                f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
                f"train.storage_path={root / 'checkpoints'}",
                f"data.cache.root={root / 'cache'}",
                f"prediction_log.location={root / 'answers'}",
                "prediction_log.images=true",
                "prediction_log.flush_interval_s=1",
                f"rollout.store={root / 'rollout'}",
                "rollout.mode=shadow",
                "rollout.flush_interval_s=1",
                "serve.reload_interval_s=1",
                f"serve.port={port}",
                "serve.cpus_per_replica=0.5",
                f"train.epochs={args.champion_epochs}",
                f"loop.min_new_labels={args.labels}",
                f"loop.min_live_requests={args.shadow}",
                f"loop.epochs={args.retrain_epochs}",
                "loop.poll_interval_s=1",
            ],
        )
        t = cfg.tracking
        print(f"one turn of the loop on the digits sample ({platform.machine()}, {os.cpu_count()} CPUs)")
        champion = timed("train the champion", run_training, cfg).model_version
        registry.set_alias(t, champion)
        set_serve_env(cfg.serve, drain_s=1)

        def start_serving() -> str:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(deployment(cfg).bind(cfg.model_dump(mode="json")), name="loop", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            assert wait_ready(url, timeout=120)
            return url

        url = timed("serve it (Ray Serve, shadow rollout)", start_serving)
        train_files = sorted((root / "data" / "train").rglob("*.png"))
        labelled = train_files[:: max(1, len(train_files) // args.labels)][: args.labels]
        held_out = sorted((root / "data" / "test").rglob("*.png"))

        def answer_and_label() -> None:
            with requests.Session() as http:
                for f in labelled:
                    rid = http.post(url + "/predict", data=inverted(f), timeout=60).json()["request_id"]
                    http.post(url + "/feedback", json={"request_id": rid, "label": f.parent.name}, timeout=60)
            while len(feedback.read_labelled(cfg)) < len(labelled):
                time.sleep(0.2)

        timed(f"{len(labelled)} answers labelled over HTTP, logged", answer_and_label)
        outcome = timed("retrain: triggers, export, fine-tune, register", retrain.retrain, cfg)
        assert outcome.retrained, outcome.reason
        candidate = outcome.candidate
        clients = Clients(url + "/predict", [inverted(f) for f in held_out[:50]])
        try:

            def shadowed() -> None:
                while rollout.report(cfg, champion, candidate).shadowed < args.shadow:
                    time.sleep(0.5)

            timed(f"{args.shadow} shadow requests (from the alias move)", shadowed)
            # The gate's test split holds what the service now meets: the digits and their negatives.
            for f in held_out:
                folder = root / "gate" / "test" / f.parent.name
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f.name).write_bytes(f.read_bytes())
                (folder / f"inverted-{f.name}").write_bytes(inverted(f))
            turn = timed(
                "loop: gate and promotion", feedback_loop.run_loop, cfg, data_root=str(root / "gate")
            )

            def swapped() -> None:
                while requests.get(url + "/model", timeout=10).json()["version"] != candidate:
                    time.sleep(0.2)

            if turn.state != "promoted":
                # To time the swap all the same: what `hotdog promote --force` does by hand.
                registry.set_alias(t, candidate)
            timed("until the replicas answer with it", swapped)
        finally:
            clients.stop()
        total = round(sum(steps.values()), 1)
        before = accuracy(
            Predictor.from_config(cfg, f"models:/{t.registered_model}/{champion}", device="cpu"), held_out
        )
        after = accuracy(
            Predictor.from_config(cfg, f"models:/{t.registered_model}/{candidate}", device="cpu"), held_out
        )
        serve.shutdown()
        ray.shutdown()

    failed = sum(s != 200 for s in clients.statuses)
    print(f"  {'in all':<44}{total:>8.1f} s")
    print(
        f"  gate: {turn.state} ({turn.reason}); held-out inverted digits: champion {before:.3f}, "
        f"candidate {after:.3f}; {len(clients.statuses)} requests during shadow and swap, {failed} failed"
    )
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "steps_s": steps,
        "total_s": total,
        "state": turn.state,
        "reason": turn.reason,
        "accuracy_inverted_before_after": [round(before, 4), round(after, 4)],
        "requests": len(clients.statuses),
        "failed_requests": failed,
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
