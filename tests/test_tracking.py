"""MLflow runs as handles: which store a config names, runs that never leak into another store,
and how the ``run`` block ends a run (FINISHED, FAILED with the reason, KILLED)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from hotdog_ray import tracking
from hotdog_ray.config import load_config
from hotdog_ray.registry import client, tracking_uri
from tests.helpers import mlflow_store


def test_store_is_config_then_environment_then_local_sqlite(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        tracking_uri(load_config().tracking) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    )  # absolute: workers agree

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(load_config().tracking) == "http://mlflow.internal:5000"
    cfg = load_config(None, ["tracking.uri=sqlite:///runs.db"])
    assert tracking_uri(cfg.tracking) == f"sqlite:///{tmp_path / 'runs.db'}"


def _only_run(cfg):
    mlflow = client(cfg.tracking)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_two_stores_in_one_process_stay_apart(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a, b = (load_config(None, [f"tracking.uri=sqlite:///{tmp_path / name}"]) for name in ("a.db", "b.db"))
    with tracking.run(a.tracking, name="a", tags={"which": "a"}) as run_a:
        run_a.log_params({"model.name": a.model.name})
    with tracking.run(b.tracking, name="b", tags={"which": "b"}) as run_b:
        run_b.log_metrics({"loss": 0.5})

    assert "MLFLOW_TRACKING_URI" not in os.environ  # no process-wide state left behind
    found_a, found_b = _only_run(a), _only_run(b)
    assert (found_a.info.run_id, found_a.data.tags["which"], found_a.data.params) == (
        run_a.id,
        "a",
        {"model.name": "first_cnn"},
    )
    assert (found_b.info.run_id, found_b.data.metrics) == (run_b.id, {"loss": 0.5})
    assert Path(tmp_path / "a.db").exists() and Path(tmp_path / "b.db").exists()


def test_leaving_the_block_normally_finishes_the_run(tmp_path):
    cfg = load_config(None, [f"tracking.uri={mlflow_store(tmp_path)}"])
    with tracking.run(cfg.tracking, name="ok") as run:
        assert _only_run(cfg).info.status == "RUNNING"
        run.set_tags({"stage": "test"})
    found = _only_run(cfg)
    assert found.info.status == "FINISHED" and found.data.tags["stage"] == "test"
    assert found.data.tags["git_commit"]


def test_an_exception_fails_the_run_with_the_reason_and_propagates(tmp_path):
    cfg = load_config(None, [f"tracking.uri={mlflow_store(tmp_path)}"])
    with pytest.raises(ValueError, match="disk on fire"):
        with tracking.run(cfg.tracking, name="bad"):
            raise ValueError("disk on fire")
    found = _only_run(cfg)
    assert found.info.status == "FAILED"
    assert found.data.tags[tracking.FAILURE_TAG] == "ValueError: disk on fire"


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_or_termination_kills_the_run(tmp_path, interrupt):
    cfg = load_config(None, [f"tracking.uri={mlflow_store(tmp_path)}"])
    with pytest.raises(interrupt):
        with tracking.run(cfg.tracking, name="stopped"):
            raise interrupt()
    found = _only_run(cfg)
    assert found.info.status == "KILLED" and tracking.FAILURE_TAG not in found.data.tags


def test_a_run_reopened_by_id_is_the_same_run_and_ends_again(tmp_path):
    cfg = load_config(None, [f"tracking.uri={mlflow_store(tmp_path)}"])
    with pytest.raises(KeyboardInterrupt):
        with tracking.run(cfg.tracking, name="sweep", tags={"kind": "sweep"}) as first:
            raise KeyboardInterrupt
    with tracking.run(cfg.tracking, resume=first.id) as again:
        assert again.id == first.id and _only_run(cfg).info.status == "RUNNING"
        again.log_metrics({"trials": 3})
    found = _only_run(cfg)
    assert found.info.status == "FINISHED" and found.data.metrics["trials"] == 3
    assert found.data.tags["kind"] == "sweep"


def test_a_handle_pickles_to_its_store_and_id(tmp_path):
    import pickle

    cfg = load_config(None, [f"tracking.uri={mlflow_store(tmp_path)}"])
    with tracking.run(cfg.tracking, name="pickled") as run:
        run.log_metrics({"a": 1.0})  # a client exists now; the copy must not carry it
        copy = pickle.loads(pickle.dumps(run))
        copy.log_epoch({"epoch": 2, "val_loss": 0.25, "diverged": "loss became nan"})
    found = _only_run(cfg)
    assert found.data.metrics == {"a": 1.0, "val_loss": 0.25}
    assert found.data.tags[tracking.DIVERGED_TAG] == "loss became nan"


def test_sigterm_ends_the_run_killed_where_nothing_else_handles_it(tmp_path):
    """``docker stop`` or Kubernetes send SIGTERM; in a process with no handler of its own the run ends KILLED."""
    import subprocess
    import sys

    cfg = load_config(None, [f"tracking.uri={mlflow_store(tmp_path)}"])
    code = (
        "import os, signal, time\n"
        "from hotdog_ray import tracking\n"
        "from hotdog_ray.config import load_config\n"
        f"cfg = load_config(None, ['tracking.uri={cfg.tracking.uri}'])\n"
        "with tracking.run(cfg.tracking, name='terminated'):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "KeyboardInterrupt" in done.stderr
    assert _only_run(cfg).info.status == "KILLED"


@pytest.fixture()
def ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in this process for the test, as at a terminal: a suite started
    as a background job (`cmd &`, a CI runner's shell) inherits SIGINT ignored."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_signals_inside_a_deferred_block_land_when_it_ends():
    """Ctrl-C inside the block is raised at its end (nested blocks: the outermost), once per signal
    kind; the handlers it replaced are back afterwards."""
    import signal

    from hotdog_ray.process import interrupts_deferred

    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            with interrupts_deferred():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
                reached.append("inner end")
            reached.append("outer end")
    assert reached == ["inner end", "outer end"]
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_during_logging_leaves_the_store_free_to_end_the_run_killed(tmp_path):
    """A KeyboardInterrupt that cuts a SQLite write in half leaves the process holding the database
    lock, and the run's KILLED update then fails after MLflow's 20 s busy timeout. Ctrl-C at random
    moments of a logging loop must always leave the run endable at once."""
    import os
    import random
    import signal
    import threading

    cfg = load_config(None, [f"tracking.uri={mlflow_store(tmp_path)}"])
    rng = random.Random(0)
    for attempt in range(8):
        with pytest.raises(KeyboardInterrupt):
            with tracking.run(cfg.tracking, name=f"cut-{attempt}") as run:
                threading.Timer(rng.uniform(0.05, 0.3), os.kill, (os.getpid(), signal.SIGINT)).start()
                for step in range(100_000):
                    run.log_metrics({"loss": 1.0}, step=step)
        assert client(cfg.tracking).get_run(run.id).info.status == "KILLED"
