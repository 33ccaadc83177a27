"""Mistakes a new user makes get one line naming what failed and what to do, a non-zero exit, and
come within 15 seconds: each case is the real ``hotdog`` command in a subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port, mlflow_store

LIMIT_S = 15


@dataclass
class Failure:
    code: int
    error: str  # the command's last stderr line
    stderr: str
    seconds: float


def hotdog(*args: str, cwd: Path) -> Failure:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "hotdog_ray", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    lines = proc.stderr.strip().splitlines()
    return Failure(proc.returncode, lines[-1] if lines else "", proc.stderr, time.monotonic() - started)


def assert_one_line(failure: Failure, command: str, *words: str) -> None:
    assert failure.code != 0, failure.stderr
    assert "Traceback" not in failure.stderr, failure.stderr
    assert failure.error.startswith(f"hotdog {command}: error: "), failure.stderr
    for word in words:
        assert word in failure.error, failure.error
    assert failure.seconds < LIMIT_S, f"{failure.seconds:.1f} s"


def test_an_unreachable_mlflow_server_fails_in_seconds(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    failure = hotdog("runs", "--set", f"tracking.uri={uri}", cwd=tmp_path)
    assert_one_line(failure, "runs", uri, "does not answer", "tracking.uri")


def test_an_unreachable_database_store_fails_in_seconds(tmp_path):
    port = free_port()
    failure = hotdog(
        "evaluate", "--set", f"tracking.uri=postgresql://mlflow:pw@127.0.0.1:{port}/mlflow", cwd=tmp_path
    )
    assert_one_line(failure, "evaluate", f"127.0.0.1:{port}", "does not answer")
    assert "pw" not in failure.error  # the password stays out of logs


@pytest.mark.parametrize(
    "uri, words",
    [
        ("htp://127.0.0.1:5000", ["'htp'", "sqlite:///PATH"]),
        ("sqlite:///no/such/folder/mlflow.db", ["no/such/folder", "does not exist"]),
    ],
)
def test_a_mistyped_mlflow_uri_says_what_is_wrong(tmp_path, uri, words):
    failure = hotdog("train", "--set", f"tracking.uri={uri}", cwd=tmp_path)
    assert_one_line(failure, "train", *words)


def test_a_row_limit_below_one_is_refused_before_any_work(tmp_path):
    failure = hotdog("runs", "--limit", "0", cwd=tmp_path)
    assert_one_line(failure, "runs", "--limit", "less than 1", "--help")
    assert len(failure.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def serve_on_a_taken_port(tmp_path_factory):
    """``hotdog serve`` with no model registered yet, on a port another process listens on."""
    folder = tmp_path_factory.mktemp("serve")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failure = hotdog(
            "serve",
            "--set",
            f"serve.port={port}",
            "--set",
            f"tracking.uri={mlflow_store(folder)}",
            cwd=folder,
        )
    return port, failure


def test_serve_on_a_taken_port_names_the_port_before_starting_ray(serve_on_a_taken_port):
    port, failure = serve_on_a_taken_port
    assert_one_line(failure, "serve", f"serve.port {port}", "is taken", "--set serve.port=")
    assert "Started a local Ray instance" not in failure.stderr


def test_serve_with_no_model_warns_at_start(serve_on_a_taken_port):
    _, failure = serve_on_a_taken_port
    warnings = [line for line in failure.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "no model to serve yet" in warnings[0] and "503" in warnings[0]
