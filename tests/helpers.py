"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import ray
import ray.train
import ray.tune
import requests
import yaml
from PIL import Image

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.1,
    message: Callable[[], object] | str = "",
) -> T:
    """The first truthy value of ``condition()``, asked every ``interval`` seconds; an AssertionError
    with ``message`` (or what it returns) once ``timeout`` seconds passed without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {message() if callable(message) else message}")
        time.sleep(interval)


def free_port() -> int:
    """A free port on loopback below Linux's ephemeral range (32768+), which the kernel hands out for
    outgoing connections and bind(0), and above Ray's worker ports (10002-19999): a port picked from
    the ephemeral range can be taken by someone else's connection before our server binds it."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


def stop_command(proc, own_ray: bool = False) -> None:
    """End a command started with ``start_new_session=True`` (its whole process group, if still
    alive), and with ``own_ray`` the Ray it started, as a test's ``finally`` must. A command that
    joined the session's Ray leaves nothing behind: Ray ends a dead driver's actors itself."""
    import subprocess
    import sys

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if own_ray:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)


def set_args(overrides: Sequence[str]) -> list[str]:
    """``--set KEY=VALUE`` for each override, as the CLI and the jobs take them."""
    return [arg for override in overrides for arg in ("--set", override)]


_STORE_TEMPLATE: list[Path] = []


def mlflow_store(folder: Path) -> str:
    """``sqlite:///<folder>/mlflow.db``, a fresh store copied from one created once per test process:
    creating MLflow's schema takes 1-2 s, copying it milliseconds, and the suite makes dozens."""
    import atexit
    import shutil
    import tempfile

    if not _STORE_TEMPLATE:
        from mlflow.tracking import MlflowClient

        folder_of_template = tempfile.mkdtemp(prefix="mlflow-template-")
        atexit.register(shutil.rmtree, folder_of_template, True)
        template = Path(folder_of_template) / "mlflow.db"
        MlflowClient(f"sqlite:///{template}").search_experiments()  # runs the schema migrations
        _STORE_TEMPLATE.append(template)
    db = Path(folder) / "mlflow.db"
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_STORE_TEMPLATE[0], db)
    return f"sqlite:///{db}"


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (a decompression bomb's calling card)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def tiny_model_config(store: Path, *overrides: str):
    """A config for a 16 px, 4-filter first_cnn tracked in a SQLite store under ``store``."""
    from hotdog_ray.config import load_config

    return load_config(
        None,
        [
            f"tracking.uri={mlflow_store(store)}",
            "data.image_size=16",
            "model.name=first_cnn",
            "model.filters=4",
            *overrides,
        ],
    )


def tiny_model(classes: Sequence[str], seed: int = 0):
    """The 16 px, 4-filter first_cnn of :func:`tiny_model_config` with seeded random weights, in eval mode."""
    import torch

    from hotdog_ray.models import build_model

    torch.manual_seed(seed)
    return build_model("first_cnn", len(classes), 16, filters=4).eval()


def register_model(
    cfg, model, classes: Sequence[str], name: str = "test-model", ood_threshold: float | None = None
) -> tuple[str, str]:
    """Log ``model`` in a new run of ``cfg``'s store and register it: (run id, version). With
    ``ood_threshold`` it carries an OOD bank (its features of a few random images) and that
    threshold (below 0: every answer is flagged out of distribution)."""
    import torch

    from hotdog_ray import confidence, model_store, tracking
    from hotdog_ray.bundle import model_meta
    from hotdog_ray.images import to_model_input
    from hotdog_ray.models import logits_and_features

    meta, bank = model_meta(cfg, list(classes)), None
    if ood_threshold is not None:
        size = meta["image_size"]
        pixels = torch.from_numpy(
            np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
        )
        with torch.inference_mode():
            _, features = logits_and_features(model, to_model_input(pixels, meta["rescale"]))
        bank = confidence.normalise(features.numpy())
        meta |= confidence.Calibration(ood_threshold=ood_threshold).meta()
    with tracking.run(cfg.tracking, name=name) as run:
        model_store.log_model(run, model, meta, bank)
    return run.id, model_store.register(cfg.tracking, run.id)


class KillAWorkerAfterEpoch(ray.train.UserCallback):
    """A Ray Train callback that SIGKILLs one training worker once, after ``epoch`` is reported and
    checkpointed, as a lost machine would; ``marker`` records that it did."""

    def __init__(self, epoch: int, marker: Path) -> None:
        self.epoch, self.marker = epoch, Path(marker)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        from ray.util.state import list_actors

        if self.marker.exists() or metrics[0].get("epoch") != self.epoch:
            return
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        self.marker.write_text(str(workers[-1].pid))
        os.kill(workers[-1].pid, signal.SIGKILL)


class HoldAfterEpoch(ray.train.UserCallback):
    """A Ray Train callback that, once ``epoch`` is reported and checkpointed, writes
    ``<folder>/reported`` and holds the run's controller until ``<folder>/removed`` appears (at most
    a minute): the test removes a node meanwhile, as a lost machine would."""

    def __init__(self, epoch: int, folder: Path) -> None:
        self.epoch, self.folder = epoch, str(folder)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        folder = Path(self.folder)
        if metrics[0].get("epoch") != self.epoch or (folder / "reported").exists():
            return
        (folder / "reported").write_text(str(self.epoch))
        hold_until_removed(folder)


class HoldThenPace(HoldAfterEpoch):
    """:class:`HoldAfterEpoch`, then every epoch trained by fewer than ``full`` workers is followed by
    a pause of ``pause_s`` (and ``<folder>/small`` is written): a run shrunk by a lost node lasts long
    enough for the cluster to regain a node and the run to grow back, whatever this machine's speed."""

    def __init__(self, epoch: int, folder: Path, full: int, pause_s: float) -> None:
        super().__init__(epoch, folder)
        self.full, self.pause_s = full, pause_s

    def after_report(self, run_context, metrics, checkpoint) -> None:
        super().after_report(run_context, metrics, checkpoint)
        if metrics[0].get("workers", self.full) < self.full:
            (Path(self.folder) / "small").write_text(str(metrics[0]["epoch"]))
            time.sleep(self.pause_s)


class HoldAfterFirstResult(ray.tune.Callback):
    """A Ray Tune callback: at the sweep's first trial result, write the trial's id and process id to
    ``<folder>/reported`` and hold the sweep's driver until ``<folder>/removed`` appears (at most a
    minute): the test removes that trial's node meanwhile. The trial has checkpointed by then."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if (self.folder / "reported").exists():
            return
        (self.folder / "reported").write_text(json.dumps({"trial": trial.trial_id, "pid": result["pid"]}))
        hold_until_removed(self.folder)


def hold_until_removed(folder: Path) -> None:
    """Holds the caller until the test writes ``<folder>/removed`` (at most a minute; then the run
    goes on, and the test's own assertions say what did not happen)."""
    try:
        wait_until(lambda: (folder / "removed").exists(), timeout=60)
    except AssertionError:
        pass


# Where a node of a bare cluster takes its Python from, and what it lacks: the jobs must get those
# settings from their runtime env.
BIN = Path(sys.executable).parent
K8S = Path(__file__).resolve().parents[1] / "k8s"
BUCKET = "hotdog-data"  # the bucket k8s/mlflow.yaml's artifact root is in
NODE_UNSET = ("AWS_", "MLFLOW_")


def ray_client_env(bare: bool = False) -> dict[str, str]:
    # The head's job drivers run `python` from PATH: make it this interpreter, which has the package.
    # Ray 2.60 clusters use token auth; the job client needs this to send the token.
    env = {k: v for k, v in os.environ.items() if not (bare and k.startswith(NODE_UNSET))}
    return {
        **env,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Waits until ``url`` answers (any status: a 401 without the token is up); fails at once when
    ``proc``, the server, exited."""

    def answers() -> bool:
        try:
            urllib.request.urlopen(url, timeout=5)
        except urllib.error.HTTPError:
            return True
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: the server exited with {proc.returncode}") from None
            return False
        return True

    wait_until(answers, timeout=timeout, interval=0.5, message=url)


def k8s_manifest(file: str, kind: str) -> dict:
    return next(d for d in yaml.safe_load_all((K8S / file).read_text()) if d and d["kind"] == kind)


def scrape(pattern: str) -> dict[tuple[str, ...], float]:
    """Samples of the node's Prometheus text whose line matches ``pattern``: {labels: value}."""
    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not re.match(pattern, line):
            continue
        series, value = line.rsplit(" ", 1)
        out[series] = float(value)
    return out


def total(pattern: str, **labels: str) -> float:
    """Sum of the samples matching ``pattern`` that carry every label given."""
    return sum(
        v
        for series, v in scrape(pattern).items()
        if all(f'{k}="{val}"' in series for k, val in labels.items())
    )


class GaugesSetOnce:
    """A job (a Ray actor) that sets each of our gauges, and one plain Ray gauge, once and lives on."""

    def set_once(self, run: str, gauges: dict[str, tuple[str, ...]]) -> None:
        from ray.util import metrics as ray_metrics

        from hotdog_ray.telemetry import _make

        self.ours = {n: _make(n, ray_metrics) for n in gauges}
        for name, labels in gauges.items():
            self.ours[name].set(3.0, tags={k: run for k in labels})
        self.plain = ray_metrics.Gauge("hotdog_test_plain_gauge", tag_keys=("run",))
        self.plain.set(3.0, tags={"run": run})


@contextlib.contextmanager
def browser_session(profile_root: Path) -> Iterator[Any]:
    """A headless Chromium under Selenium, quit afterwards; the test is skipped where the machine has
    no chromium and chromedriver (failed instead when HOTDOG_REQUIRE_BROWSER is set, as in CI)."""
    import pytest
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (browser and driver_path):
        if os.environ.get("HOTDOG_REQUIRE_BROWSER"):
            pytest.fail("HOTDOG_REQUIRE_BROWSER is set but chromium or chromedriver is missing")
        pytest.skip(
            "no chromium + chromedriver on this machine (apt-get install chromium chromium-driver; CI does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_root / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class SharedServe:
    """Ray Serve on the session's Ray, for the tests that deploy their apps in-process: started
    when a test first needs it and kept between tests and modules (a start and a shutdown cost
    seconds and three processes), each test deleting the apps it made. :meth:`stop` is for a test
    whose subprocess runs Serve itself (``hotdog serve``, the GPU check); the next user starts it
    again, on a fresh port."""

    def __init__(self) -> None:
        self.port: int | None = None

    @property
    def url(self) -> str:
        from ray import serve

        if self.port is None:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            self.port = port
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        from ray import serve

        if self.port is not None and ray.is_initialized():
            serve.shutdown()
        self.port = None


@contextlib.contextmanager
def serve_app(cfg, name: str, shared: SharedServe, route_prefix: str = "/") -> Iterator[str]:
    """``cfg``'s app ``name`` on the session's Serve (a quarter CPU a replica) at ``route_prefix``:
    its URL once ready, the app deleted afterwards."""
    from ray import serve

    from hotdog_ray.server.launch import deployment, wait_ready

    base = shared.url
    cfg = cfg.model_copy(deep=True)
    cfg.serve.port, cfg.serve.cpus_per_replica = shared.port, 0.25
    try:
        serve.run(deployment(cfg).bind(cfg.model_dump(mode="json")), name=name, route_prefix=route_prefix)
        url = base + route_prefix.rstrip("/")
        assert wait_ready(url, timeout=60)
        yield url
    finally:
        serve.delete(name)


class SteadyClients:
    """Clients posting one image to ``url`` back to back until stopped: each request's (sent,
    answered, "200" or the failure), and the request ids of the answers."""

    def __init__(self, url: str, data: bytes, count: int = 4) -> None:
        self.url, self.data = url, data
        self.outcomes: list[tuple[float, float, str]] = []
        self.answered_ids: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(count)]
        for t in self._threads:
            t.start()

    def _client(self) -> None:
        with requests.Session() as http:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    answer = http.post(self.url, data=self.data, timeout=60)
                    status = str(answer.status_code)
                    if answer.status_code == 200:
                        self.answered_ids.append(answer.json()["request_id"])
                except requests.RequestException as exc:
                    status = type(exc).__name__
                self.outcomes.append((t0, time.monotonic(), status))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=70)


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server programs (``initdb``, ``postgres``), newest first."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A PostgreSQL server of its own on loopback, with a password-protected role and database
    ``mlflow``; yields the URI in the form the operations guide and ``k8s/secrets.example.yaml`` give
    (``postgresql://mlflow:PASSWORD@HOST:PORT/mlflow``). Stopped by process id (SIGTERM: a smart
    shutdown)."""
    bin_dir = postgres_bin()
    assert bin_dir is not None, "PostgreSQL is not installed (Debian's package: postgresql)"
    # PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # A folder of its own in /tmp: pytest's are private to their owner, and the server's user must enter it.
    folder = Path(tempfile.mkdtemp(prefix="hotdog-postgres-"))
    password = uuid.uuid4().hex
    (folder / "pw").write_text(password)
    if as_user:
        pg = pwd.getpwnam("postgres")
        os.chown(folder, pg.pw_uid, pg.pw_gid)
        os.chown(folder / "pw", pg.pw_uid, pg.pw_gid)
    data = folder / "data"
    init = subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", f"--pwfile={folder / 'pw'}"]
        + ["--auth=scram-sha-256", "-E", "UTF8"],
        capture_output=True,
        text=True,
    )
    assert init.returncode == 0, init.stdout + init.stderr
    port = free_port()
    proc = subprocess.Popen(
        [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder)]
        + ["-c", "listen_addresses=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    env = {**os.environ, "PGPASSWORD": password}
    try:
        wait_until(
            lambda: (
                proc.poll() is not None
                or subprocess.run(
                    [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
                ).returncode
                == 0
            ),
            timeout=30,
            message="PostgreSQL did not start",
        )
        assert proc.poll() is None, proc.stderr.read().decode()
        subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
            env=env,
            check=True,
            capture_output=True,
        )
        yield f"postgresql://mlflow:{password}@127.0.0.1:{port}/mlflow"
    finally:
        proc.terminate()  # runuser passes SIGTERM on to the server
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


def listening_process(port: int, timeout: float = 10):
    """The local process listening on ``port`` (a psutil.Process; None if none is found in ``timeout``).

    Polled: HAProxy hands its socket to a new process on every config reload."""
    import psutil

    def listening():
        for proc in psutil.process_iter(["name"]):
            try:
                conns = proc.net_connections("tcp")
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
                return proc
        return None

    try:
        return wait_until(listening, timeout=timeout, interval=0.2)
    except AssertionError:
        return None


def listener(port: int, timeout: float = 10) -> str:
    """The name of the local process listening on ``port`` ("" if none is found in ``timeout``)."""
    proc = listening_process(port, timeout)
    return proc.info["name"] if proc else ""
