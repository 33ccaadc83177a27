"""The ``hotdog`` command line, run in-process against the session's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hotdog_ray.cli import main


def test_sample_then_inspect_reports_1797_images_in_10_classes(ray_session, tmp_path, capsys):
    dest = tmp_path / "sample"
    assert main(["sample", str(dest)]) == 0
    assert main(["inspect", str(dest), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["images"] == 1797 and report["num_classes"] == 10 and report["unreadable"] == 0
    assert report["splits"]["train"]["min_size"] == [8, 8]

    assert main(["inspect", str(dest)]) == 0
    table = capsys.readouterr().out
    assert "1797 images in 10 classes" in table and "majority class" in table


def test_inspect_table_flags_majority_baseline_and_bad_files(ray_session, image_tree, capsys, tmp_path):
    assert main(["inspect", str(image_tree.root), "--set", "data.max_classes=2"]) == 0
    out = capsys.readouterr().out
    assert "unreadable files" in out and "truncated.jpg" in out


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "nothing found" in capsys.readouterr().err
    (tmp_path / "ds" / "train" / "a").mkdir(parents=True)
    assert main(["prepare", str(tmp_path / "ds"), str(tmp_path / "o"), "--layout", "split-folders"]) == 2
    assert "error:" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "hotdog_ray", "--help"], capture_output=True, text=True, check=True
    )
    for cmd in ("sample", "prepare", "inspect", "config"):
        assert cmd in out.stdout


def test_help_loads_no_torch_ray_or_mlflow():
    code = (
        "import sys\n"
        "from hotdog_ray.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    out = subprocess.run(
        [sys.executable, "-m", "hotdog_ray", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"hotdog-ray {version('hotdog-ray')}"


def test_every_user_error_is_a_hotdog_error_and_exits_2(capsys):
    from hotdog_ray import errors

    user_errors = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(user_errors) == 11 and all(issubclass(c, errors.HotdogError) for c in user_errors)
    assert main(["config", "--set", "train.epochs=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.epochs" in err[0]


def test_only_jobs_run_from_rays_working_dir_copy_check_their_stores(tmp_path, monkeypatch):
    from hotdog_ray.config import load_config
    from hotdog_ray.process import lost_results

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    default = load_config(None, [])
    assert lost_results(default, "train", cwd=str(tmp_path)) == []  # a laptop: relative is fine
    problems = lost_results(default, "train", cwd=copy)
    assert len(problems) == 3 and "MLFLOW_TRACKING_URI" in problems[0]
    safe = load_config(
        None, ["tracking.uri=http://mlflow:5000", f"train.storage_path={tmp_path}", f"data.root={tmp_path}"]
    )
    assert lost_results(safe, "train", cwd=copy) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    scoring = load_config(None, ["score.output=predictions"])
    assert [p.split("=")[0] for p in lost_results(scoring, "score", cwd=copy)] == ["score.output"]


def test_mlflows_notices_only_with_verbose(tmp_path):
    """A fresh store: MLflow announces its schema migrations, which say nothing about the command."""

    # main() run in this process by other tests leaves its quiet settings in os.environ
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    }

    def runs(*flags: str, store: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "hotdog_ray", *flags, "runs", "--set", f"tracking.uri=sqlite:///{store}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return proc.stdout + proc.stderr

    assert "Creating initial MLflow database tables" not in runs(store=str(tmp_path / "quiet.db"))
    assert "Creating initial MLflow database tables" in runs("-v", store=str(tmp_path / "loud.db"))
