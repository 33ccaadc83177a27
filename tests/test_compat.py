"""Each private Ray API of hotdog_ray.compat still does what we use it for: a Ray upgrade that moves
one fails here, naming it, before it fails in a job."""

from __future__ import annotations

import logging
import os

import pyarrow.fs as pafs
import pytest
import ray

from hotdog_ray import compat


def test_ray_is_the_version_compat_was_checked_against():
    assert ray.__version__ == compat.CHECKED_WITH, (
        f"Ray {ray.__version__} is installed; hotdog_ray/compat.py was checked against {compat.CHECKED_WITH}: "
        "run this file's tests, then move CHECKED_WITH"
    )


def test_train_v2_report_logger_is_the_module_train_v2_logs_reports_with():
    """Train V2's context module logs with a logger named by its file; quieting it is what
    sessions.quiet_train_reports relies on."""
    import ray.train.v2._internal.execution.context as context

    from hotdog_ray.sessions import quiet_train_reports

    name = compat.train_v2_report_logger()
    assert name.endswith(".py") and context.logger.name == name
    quiet_train_reports()
    assert not context.logger.isEnabledFor(logging.INFO)


def test_trial_storage_raises_outside_a_trial_and_reads_ray_trains_storage_context():
    import ray.train._internal.session as session
    from ray.train._internal.storage import StorageContext

    with pytest.raises(Exception):  # whatever Ray raises outside a trial, it must not answer
        compat.trial_storage()
    assert callable(session.get_storage)
    # The two attributes trial_storage reads, on the object get_storage returns in a trial.
    context = StorageContext(storage_path="/tmp/hotdog-compat", experiment_dir_name="e", trial_dir_name="t")
    assert isinstance(context.storage_filesystem, pafs.FileSystem)
    assert context.trial_fs_path.endswith("e/t")


def test_autoscaling_max_resources_answers_on_a_running_ray(ray_session):
    assert compat.autoscaling_max_resources() is None  # the session's Ray has no autoscaler


def test_metrics_report_interval_is_the_one_ray_runs_with(ray_session):
    """The interval the session's Ray was started with (conftest's 2 s unless the environment says
    otherwise; Ray's own default is 10 s, so a hard-coded value fails here); the gauges' keeper
    refreshes at half of it."""
    from hotdog_ray.telemetry import gauge_keeper

    interval = compat.metrics_report_interval_s()
    assert interval == int(os.environ["RAY_metrics_report_interval_ms"]) / 1000
    assert gauge_keeper().period_s == interval / 2  # a fresh point in every report
