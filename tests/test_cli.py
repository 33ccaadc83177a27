"""The ``hotdog`` command line, run in-process against the session's Ray."""

from __future__ import annotations

import json
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
    out = subprocess.run([sys.executable, "-m", "hotdog_ray", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("sample", "prepare", "inspect", "config"):
        assert cmd in out.stdout
