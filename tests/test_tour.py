"""The README's five-minute tour and docs/serving.md's endpoint examples, run as printed: the
commands are read from the documents, run by bash in a folder laid out as after the Quickstart, and
each answer is held to the fields the document shows."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import requests
from ray import serve

from tests.helpers import wait_until

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tour_block() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def examples(doc: Path) -> list[tuple[str, dict]]:
    """Each bash block followed at once by a json block: the commands and the answer shown."""
    block = r"((?:(?!```).)*)```"  # up to the block's end, never into the next block
    found = re.findall(rf"```bash\n{block}\s*```json\n{block}", doc.read_text(), flags=re.S)
    return [(script, json.loads(answer)) for script, answer in found]


def same_fields(got: object, shown: object, where: str = "answer") -> None:
    """The answer has the fields the document shows (the first item of a list stands for all);
    a value shown as "..." or a shortened dict ("...": ...) is not compared further."""
    if isinstance(shown, dict) and "..." not in shown:
        assert isinstance(got, dict) and set(got) == set(shown), f"{where}: {sorted(got)} vs {sorted(shown)}"
        for key in shown:
            same_fields(got[key], shown[key], f"{where}.{key}")
    elif isinstance(shown, list) and shown and isinstance(shown[0], dict):
        assert isinstance(got, list) and got, where
        same_fields(got[0], shown[0], f"{where}[0]")


@pytest.fixture(scope="module")
def after_quickstart(ray_session, shared_serve, tmp_path_factory):
    """A folder as the Quickstart's command 1 leaves it: the sample written and trained on by the
    job (two epochs in the driver instead of 30 epochs on a worker), the store in ./mlflow.db; no
    Serve running (the documents' `hotdog serve` starts its own on port 8000)."""
    shared_serve.stop()
    folder = tmp_path_factory.mktemp("tour")
    for shared in ("configs", "jobs"):
        (folder / shared).symlink_to(REPO / shared)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # what `source .venv/bin/activate` does
        "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,  # the session's Ray, not a new one
        "RAY_AUTH_MODE": "token",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    for command in (
        "hotdog sample data/sample",
        "python jobs/train.py --config configs/sample.yaml --set train.epochs=2 --set train.num_workers=0",
    ):
        subprocess.run(command, shell=True, cwd=folder, env=env, check=True, capture_output=True, timeout=300)
    return folder, env


class Background:
    """Commands a document runs with ``&``, stopped with SIGTERM (hotdog serve then shuts Serve
    down on the shared Ray), by process group."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env, self.procs = folder, env, []

    def start(self, command: str, ready: str) -> None:
        """Run ``command`` (without its ``&``) and wait until ``ready`` answers 200."""
        log = self.folder / f"background-{len(self.procs)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                ["bash", "-c", command.rstrip().rstrip("&")],
                cwd=self.folder,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)

        def answers_200() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{command}: exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(ready, timeout=5) as answer:
                    return answer.status == 200
            except (OSError, urllib.error.URLError):
                return False

        wait_until(
            answers_200,
            timeout=120,
            message=lambda: f"{command}: {ready} never ready:\n{log.read_text()[-3000:]}",
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        serve.shutdown()  # nothing of the app outlives the test, whatever happened


def run(script: str, folder: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, f"{script}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_the_readmes_five_minute_tour_works_as_printed(after_quickstart):
    folder, env = after_quickstart
    lines = tour_block()
    assert lines[0] == "source .venv/bin/activate"  # the fixture's PATH does what it does
    shown = json.loads(re.search(r"```json\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S).group(1))
    background = Background(folder, env)
    try:
        for line in lines[1:]:
            if line.endswith("&"):
                port = re.search(r"--port (\d+)", line)  # mlflow ui's; hotdog serve's is 8000
                background.start(
                    line,
                    f"http://127.0.0.1:{port.group(1)}/health" if port else "http://127.0.0.1:8000/readyz",
                )
                continue
            out = run(line, folder, env)
            if line.startswith("curl"):
                same_fields(json.loads(out), shown)
        mlflow_ui = requests.get(
            "http://127.0.0.1:5000/api/2.0/mlflow/experiments/get-by-name?experiment_name=hotdog-ray",
            timeout=30,
        ).json()
        assert mlflow_ui["experiment"]["name"] == "hotdog-ray"  # the UI shows the Quickstart's run
    finally:
        background.stop()
    (partition,) = (folder / "scores").glob("date=*")
    summary = json.loads((partition / "_summary.json").read_text())
    assert summary["scored"] == 270 and summary["failed"] == 0


def test_every_serving_example_answers_as_documented(after_quickstart):
    folder, env = after_quickstart
    doc = REPO / "docs" / "serving.md"
    start = next(
        line
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S)
        for line in block.splitlines()
        if line.startswith("hotdog serve") and line.endswith("&") and "prediction_log" in line
    )
    cases = examples(doc)
    assert {"/predict", "/predict/batch", "/explain", "/feedback", "/model", "/readyz"} <= {
        re.findall(r"http://127\.0\.0\.1:8000(/[\w/]+)", script)[-1] for script, _ in cases
    }
    background = Background(folder, env)
    try:
        background.start(start, "http://127.0.0.1:8000/readyz")
        for script, shown in cases:
            got = json.loads(run(script, folder, env).strip().splitlines()[-1])
            same_fields(got, shown, script.split()[-1])
            if "error" in shown:
                assert got == shown
    finally:
        background.stop()
    # The log is where the command's folder says, not in the working directory of the Ray it joined.
    assert list((folder / "answers").glob("date=*/*.parquet"))
