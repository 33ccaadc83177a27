"""Training for real: two Ray Train workers with S3 in and out, a killed worker, a resumed run
name, and the loop's logic (early stopping, divergence, reproducibility) in the driver
(``train.num_workers=0``), with the MLflow run and registry it leaves behind."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hotdog_ray import tracking
from hotdog_ray.config import load_config
from hotdog_ray.errors import ConfigError, TrainingError
from hotdog_ray.evaluate import predict_batches
from hotdog_ray.loop import EarlyStopping, Loop, check_loss, per_worker_batch
from hotdog_ray.model_store import load_model
from hotdog_ray.registry import client
from hotdog_ray.train import run_training
from tests.helpers import KillAWorkerAfterEpoch, mlflow_store, set_args, stop_command, wait_until


def tiny_overrides(tmp_path, root: str, *overrides: str) -> list[str]:
    return [
        f"data.root={root}",
        "data.image_size=16",
        "model.name=first_cnn",
        "model.filters=4",
        "train.batch_size=8",
        "train.epochs=2",
        "train.cpus_per_worker=0.5",
        "train.learning_rate=0.01",
        f"train.storage_path={tmp_path / 'ckpt'}",
        f"tracking.uri={mlflow_store(tmp_path)}",
        "train.max_failures=1",
        *overrides,
    ]


def tiny_config(tmp_path, root: str, *overrides: str):
    return load_config(None, tiny_overrides(tmp_path, root, *overrides))


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_server, image_tree, tmp_path_factory):
    """One 2-worker run that reads from S3 and checkpoints to S3, and loses a worker (SIGKILL from
    outside the loop) after its first epoch; several tests inspect it."""
    tmp = tmp_path_factory.mktemp("s3run")
    bucket = s3_server.bucket("train")
    root = s3_server.upload_dir(image_tree.root, bucket, "data")
    cfg = tiny_config(tmp, root, "train.num_workers=2", f"train.storage_path=s3://{bucket}/checkpoints")
    marker = tmp / "killed"
    out = run_training(cfg, callbacks=[KillAWorkerAfterEpoch(0, marker)])
    return cfg, out, bucket, s3_server, marker


def test_two_workers_from_s3_checkpoint_to_s3(s3_run, image_tree):
    cfg, out, bucket, s3, _ = s3_run
    assert [h["epoch"] for h in out.history] == [0, 1]
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=bucket, Prefix="checkpoints/")["Contents"]]
    assert any(k.endswith("/state.pt") for k in keys)
    # every bad file of train, validation and test was skipped and reported
    assert len(out.skipped) == len(image_tree.bad)
    assert out.test_metrics["num_images"] == image_tree.good_count("test")


def test_mlflow_run_has_params_curves_artifacts_and_version(s3_run):
    cfg, out, *_ = s3_run
    mlflow = client(cfg.tracking)
    run = mlflow.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "first_cnn" and run.data.params["train.num_workers"] == "2"
    assert run.data.tags["classes"] == "cat,dog,hotdog" and run.data.tags["dataset"].startswith("s3://")
    assert [m.step for m in mlflow.get_metric_history(out.run_id, "val_loss")] == [0, 1]
    for key in ("test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_majority_baseline"):
        assert key in run.data.metrics
    for key in (
        "temperature",
        "test_ece",
        "test_ece_uncalibrated",
        "test_brier",
        "test_in_distribution_rate",
    ):
        assert key in run.data.metrics  # calibration and the OOD threshold (tests/test_ood.py: their values)
    artifacts = {a.path for a in mlflow.list_artifacts(out.run_id)} | {
        a.path
        for d in ("model", "model/artifacts/bundle", "evaluation")
        for a in mlflow.list_artifacts(out.run_id, d)
    }
    assert {
        "curves.png",
        "classes.json",
        "config.yaml",
        "model/MLmodel",
        "model/artifacts/bundle/weights.pt",
        "model/artifacts/bundle/model.json",
        "model/artifacts/bundle/model.onnx",
        "model/artifacts/bundle/ood_bank.npy",
        "evaluation/confusion_matrix.png",
        "evaluation/reliability.png",
        "evaluation/misclassified.png",
        "evaluation/test_report.txt",
    } <= artifacts
    assert out.model_version == "1"
    version = mlflow.get_model_version(cfg.tracking.registered_model, "1")
    assert version.run_id == out.run_id and version.tags["onnx"] == "exported"
    assert run.data.tags["onnx"] == "exported"


def test_model_from_registry_predicts_what_it_predicted_before(s3_run):
    cfg, out, *_ = s3_run
    bundle = load_model(cfg.tracking, f"models:/{cfg.tracking.registered_model}/{out.model_version}")
    assert bundle.classes == out.classes and bundle.meta["image_size"] == 16
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), out.model.eval()(x))


def test_killed_worker_resumes_without_repeating_an_epoch(s3_run):
    cfg, out, *_, marker = s3_run
    assert marker.exists()  # a worker really died after epoch 0 was checkpointed
    assert [h["epoch"] for h in out.history] == [0, 1]  # the restarted group went on with epoch 1
    assert [m.step for m in client(cfg.tracking).get_metric_history(out.run_id, "loss")] == [0, 1]


def test_rerunning_a_finished_run_name_resumes_instead_of_restarting(s3_run):
    """The two-worker run above, rerun by name with one more epoch on one worker (fewer machines
    tonight): it continues from its S3 checkpoint."""
    cfg, out, *_ = s3_run
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3, "num_workers": 1})})
    again = run_training(longer, run_name=out.run_name, register=False, evaluate_test=False)
    assert [h["epoch"] for h in again.history] == [0, 1, 2]
    assert [m.step for m in client(cfg.tracking).get_metric_history(again.run_id, "val_loss")] == [2]


def _swap_validation_labels(image_tree, tmp_path):
    root = tmp_path / "swapped"
    shutil.copytree(image_tree.root, root)
    val = root / "validation"
    (val / "cat").rename(val / "tmp")
    (val / "dog").rename(val / "cat")
    (val / "tmp").rename(val / "dog")
    return root


def test_early_stopping_stops_and_restores_best_weights(ray_session, image_tree, tmp_path):
    # Validation labels contradict training, so the better the model fits, the worse val_loss gets.
    root = _swap_validation_labels(image_tree, tmp_path)
    cfg = tiny_config(
        tmp_path,
        str(root),
        "train.epochs=12",
        "train.early_stopping_patience=2",
        "train.num_workers=0",
        "train.learning_rate=0.02",
    )
    out = run_training(cfg, register=False, evaluate_test=False)
    best = min(range(len(out.history)), key=lambda i: out.history[i]["val_loss"])
    assert len(out.history) == best + 3 < 12
    assert out.history[-1]["stopped_early"]
    # the returned weights are the best epoch's: they reproduce its val_loss
    from hotdog_ray.data import ImagePipeline, iter_torch_batches
    from hotdog_ray.models import loss_fn

    pipe = ImagePipeline.from_config(cfg.data)
    y, p = predict_batches(
        out.model, iter_torch_batches(pipe.dataset("validation"), batch_size=64, rescale="unit")
    )
    logits = (
        torch.logit(torch.from_numpy(p[:, 1:2]).double().clamp(1e-7, 1 - 1e-7))
        if p.shape[1] == 2
        else torch.log(torch.from_numpy(p))
    )
    assert loss_fn(logits.float(), torch.from_numpy(y)).item() == pytest.approx(
        out.history[best]["val_loss"], rel=1e-3
    )


def _runs(cfg) -> list:
    mlflow = client(cfg.tracking)
    return mlflow.search_runs([mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id])


def test_diverging_loss_fails_clearly_and_marks_the_run_failed(ray_session, image_tree, tmp_path):
    cfg = tiny_config(
        tmp_path,
        str(image_tree.root),
        "train.optimizer=sgd",
        "train.learning_rate=10",
        "train.momentum=0.99",
        "train.epochs=6",
        "train.max_loss=50",
        "train.num_workers=0",
    )
    with pytest.raises(TrainingError, match="diverged"):
        run_training(cfg, register=False, evaluate_test=False)
    runs = _runs(cfg)
    assert runs[0].info.status == "FAILED"
    assert "max_loss" in runs[0].data.tags["diverged"]
    assert "max_loss" in runs[0].data.tags[tracking.FAILURE_TAG]
    assert (
        len(client(cfg.tracking).get_metric_history(runs[0].info.run_id, "loss")) < 6
    )  # stopped, not trained on


def test_a_run_that_raises_mid_training_ends_failed_with_the_reason(
    ray_session, image_tree, tmp_path, monkeypatch
):
    cfg = tiny_config(tmp_path, str(image_tree.root), "train.epochs=3", "train.num_workers=0")
    validate, calls = Loop.validate, []

    def validate_then_break(self, shard, world):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("validation volume went away")
        return validate(self, shard, world)

    monkeypatch.setattr(Loop, "validate", validate_then_break)
    with pytest.raises(OSError, match="went away"):
        run_training(cfg, register=False, evaluate_test=False)
    (run,) = _runs(cfg)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.FAILURE_TAG] == "OSError: validation volume went away"
    assert [m.step for m in client(cfg.tracking).get_metric_history(run.info.run_id, "val_loss")] == [0]


def test_the_loop_in_the_driver_trains_checkpoints_resumes_and_registers(ray_session, image_tree, tmp_path):
    """``train.num_workers=0``: no worker group, but the same checkpoints, MLflow run and version."""
    cfg = tiny_config(tmp_path, str(image_tree.root), "train.num_workers=0", "train.num_to_keep=1")
    out = run_training(cfg, run_name="driver")
    assert [h["epoch"] for h in out.history] == [0, 1]
    assert out.checkpoint_path.endswith("driver/checkpoint_000001")
    assert sorted(p.name for p in (tmp_path / "ckpt" / "driver").iterdir()) == ["checkpoint_000001"]
    assert (Path(out.checkpoint_path) / "state.pt").is_file()
    run = client(cfg.tracking).get_run(out.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["num_workers"] == "0"
    assert [m.step for m in client(cfg.tracking).get_metric_history(out.run_id, "val_loss")] == [0, 1]
    assert out.model_version == "1" and out.test_metrics["num_images"] == image_tree.good_count("test")
    bundle = load_model(cfg.tracking, f"models:/{cfg.tracking.registered_model}/1")
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), out.model(x))

    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})})
    again = run_training(longer, run_name="driver", register=False, evaluate_test=False)
    assert [h["epoch"] for h in again.history] == [0, 1, 2]  # continued at epoch 2, repeated nothing
    assert [m.step for m in client(cfg.tracking).get_metric_history(again.run_id, "val_loss")] == [2]


def test_ctrl_c_ends_a_training_run_killed(image_tree, tmp_path, joining_env):
    """``hotdog train`` interrupted with SIGINT mid-run: the MLflow run ends KILLED, not RUNNING."""
    overrides = tiny_overrides(tmp_path, str(image_tree.root), "train.num_workers=0", "train.epochs=200")
    cfg = load_config(None, overrides)
    cmd = [
        str(Path(sys.executable).parent / "hotdog"),
        "train",
        "--no-register",
        *set_args(overrides),
    ]
    log = open(tmp_path / "train.log", "w")
    # A shell started in the background ignores SIGINT and its children inherit that: restore Ctrl-C.
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=joining_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Wait for the first epoch's line: the MLflow run is open by then.

        def first_epoch() -> bool:
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            return "epoch 1/200" in (tmp_path / "train.log").read_text()

        wait_until(
            first_epoch,
            timeout=180,
            interval=0.2,
            message=lambda: (tmp_path / "train.log").read_text()[-3000:],
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        stop_command(proc)
    (run,) = _runs(cfg)
    assert run.info.status == "KILLED"


@pytest.mark.parametrize(
    "value,ok", [(0.7, True), (50.0, True), (50.1, False), (float("nan"), False), (float("inf"), False)]
)
def test_check_loss_rejects_nan_inf_and_explosions(value, ok):
    if ok:
        check_loss(torch.tensor(value), epoch=0, step=0, max_loss=50)
    else:
        with pytest.raises(TrainingError, match="diverged"):
            check_loss(torch.tensor(value), epoch=3, step=7, max_loss=50)


def test_the_global_batch_stays_when_the_worker_count_changes():
    # an elastic run shrinking from 4 workers to 3 to 1 keeps (about) the configured 64 images a step
    assert [per_worker_batch(64, w) * w for w in (4, 2, 1)] == [64, 64, 64]
    assert per_worker_batch(64, 3) * 3 == 63 and per_worker_batch(2, 4) == 1


def test_early_stopping_state_machine():
    es = EarlyStopping(patience=2)
    assert es.update(0, 1.0) and not es.should_stop
    assert not es.update(1, 1.1) and not es.should_stop
    assert es.update(2, 0.9)
    es.update(3, 0.95)
    es.update(4, 0.99)
    assert es.should_stop and es.best_epoch == 2
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(es.state_dict())
    assert restored == es
    assert not EarlyStopping(patience=None).should_stop


def test_fixed_seed_reproduces_an_augmented_cpu_run(ray_session, image_tree, tmp_path):
    # One epoch is enough: the data test checks that later epochs get fresh, equally reproducible draws.
    args = (
        "train.epochs=1",
        "train.num_workers=0",
        "data.augment.horizontal_flip=true",
        "data.augment.rotation=20",
        "model.dropout=0.3",
    )
    a = run_training(
        tiny_config(tmp_path / "a", str(image_tree.root), *args), register=False, evaluate_test=False
    )
    b = run_training(
        tiny_config(tmp_path / "b", str(image_tree.root), *args), register=False, evaluate_test=False
    )
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    assert [[h[k] for k in keys] for h in a.history] == [[h[k] for k in keys] for h in b.history]
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())


def test_an_epoch_an_attempt_logged_before_it_died_is_trained_again_but_logged_once(tmp_path):
    """report() logs before it checkpoints (Tune may end a trial right after its last report): a
    process that died in between left an epoch in MLflow but not on disk, and the next attempt,
    resuming from the older checkpoint, trains that epoch again without logging it twice."""
    from hotdog_ray import sessions, storage, tracking
    from hotdog_ray.config import load_config

    cfg = load_config(None, [f"tracking.uri={mlflow_store(tmp_path)}", "train.num_to_keep=3"])
    folder = storage.resolve(str(tmp_path / "checkpoints" / "run"))
    epoch = lambda e: {"epoch": e, "loss": 1.0 / (e + 1), "val_loss": 2.0 / (e + 1)}  # noqa: E731
    with tracking.run(cfg.tracking, name="died") as run:
        first = sessions.DriverSession(cfg, run, folder)
        first.report(epoch(0), {"epoch": 0, "history": [epoch(0)]})
        run.log_epoch(epoch(1))  # died after epoch 1's log, before its checkpoint
        again = sessions.DriverSession(cfg, run, folder)
        assert again.checkpoint_state()["epoch"] == 0  # so epoch 1 runs again
        for e in (1, 2):
            again.report(epoch(e), {"epoch": e, "history": [epoch(i) for i in range(e + 1)]})
        history = run.client.get_metric_history(run.id, "val_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert sessions.checkpoint_names(folder) == [f"checkpoint_{e:06d}" for e in range(3)]


def test_a_restarted_trial_takes_the_newest_readable_checkpoint_of_its_folder(tmp_path, monkeypatch):
    """Tune may not have recorded a trial's last checkpoint (its node went before the driver asked):
    the trial reads its own folder, newest first, and skips one cut short."""
    import pyarrow.fs as pafs
    from ray import tune

    from hotdog_ray import compat, sessions, tracking
    from hotdog_ray.config import load_config

    for epoch in (0, 1):
        (tmp_path / f"checkpoint_00000{epoch}").mkdir()
        torch.save({"epoch": epoch}, tmp_path / f"checkpoint_00000{epoch}" / sessions.STATE_FILE)
    (tmp_path / "checkpoint_000002").mkdir()
    (tmp_path / "checkpoint_000002" / sessions.STATE_FILE).write_bytes(b"cut short")
    (tmp_path / "params.json").write_text("{}")  # the trial folder's other files are not checkpoints
    monkeypatch.setattr(compat, "trial_storage", lambda: (pafs.LocalFileSystem(), str(tmp_path)))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)  # what Tune recorded: nothing

    assert [Path(c.path).name for c in sessions._trial_checkpoints()] == [
        "checkpoint_000002",
        "checkpoint_000001",
        "checkpoint_000000",
    ]
    cfg = load_config(None, [f"tracking.uri={mlflow_store(tmp_path / 'store')}"])
    with tracking.run(cfg.tracking, name="trial") as run:
        session = sessions.TrialSession(cfg, run)
        assert session.checkpoint_state() == {"epoch": 1}

        monkeypatch.setattr(
            compat, "trial_storage", lambda: (_ for _ in ()).throw(RuntimeError("no session"))
        )
        assert sessions._trial_checkpoints() == [] and session.checkpoint_state() is None


def test_a_resumed_optimizer_keeps_its_state_on_the_models_device():
    """Regression (found on a GPU by bench/gpu_check.py): the model must reach its device before the
    optimizer loads a checkpoint, or Adam's state stays on the CPU beside CUDA parameters. The meta
    device stands in for a GPU here: it is another device that any machine has."""
    cfg = load_config(None, ["model.name=first_cnn", "data.image_size=16", "train.use_gpu=false"])
    classes = ["a", "b"]
    first = Loop(cfg, classes, torch.device("cpu"), rank=0)
    first.model(torch.rand(2, 3, 16, 16)).sum().backward()
    first.optimizer.step()
    state = first.checkpoint(epoch=0)

    again = Loop(cfg, classes, torch.device("meta"), rank=0)
    again.resume(state)
    tensors = [
        value
        for per_param in again.optimizer.state.values()
        for key, value in per_param.items()
        if key != "step" and torch.is_tensor(value)  # Adam keeps its step count on the CPU by design
    ]
    assert tensors and {t.device.type for t in tensors} == {"meta"}
    assert {p.device.type for p in again.model.parameters()} == {"meta"}


def test_placement_fits_workers_beside_the_data_tasks_or_says_why():
    from hotdog_ray.runtime import placement_problem

    two_nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    # The hang a user met: 1.5-CPU workers on 2-CPU nodes leave 0.5 free on each, data tasks need 1.
    assert "at most 0.5 CPU free" in placement_problem(two_nodes, 2, {"CPU": 1.5}, 1.0)
    assert placement_problem([{"CPU": 3.0}, {"CPU": 3.0}], 2, {"CPU": 2.0}, 1.0) is None
    assert "only 2 of the 3 workers" in placement_problem(two_nodes, 3, {"CPU": 1.5}, 1.0)
    gpu_nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}]
    assert placement_problem(gpu_nodes, 1, {"CPU": 1.0, "GPU": 1.0}, 1.0) is None
    assert "only 1 of the 2" in placement_problem(gpu_nodes, 2, {"CPU": 1.0, "GPU": 1.0}, 1.0)


def test_training_that_cannot_fit_fails_in_seconds_naming_the_keys(ray_session, image_tree, tmp_path):
    """On the session's 2-CPU node, two 1-CPU workers would leave nothing for reading images."""
    cfg = tiny_config(tmp_path, str(image_tree.root), "train.num_workers=2", "train.cpus_per_worker=1")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        run_training(cfg, run_name="too-big")
    assert time.monotonic() - t0 < 10
    assert "train.num_workers or train.cpus_per_worker" in str(err.value)
    assert "asked 2 x {CPU: 1}" in str(err.value) and "{CPU: 2}" in str(err.value)
    assert not (tmp_path / "ckpt" / "too-big").exists()  # nothing started


def test_an_autoscaling_cluster_waits_for_nodes_instead_of_failing(ray_session, monkeypatch, caplog):
    """Where the autoscaler may add what is missing, the check logs and lets Ray wait for the nodes;
    beyond the autoscaler's maximum it still fails."""
    from hotdog_ray import runtime

    assert runtime.within({"CPU": 16, "GPU": 4}, 4, {"CPU": 2.0, "GPU": 1.0}, 1.0)
    assert not runtime.within({"CPU": 16, "GPU": 4}, 5, {"CPU": 2.0, "GPU": 1.0}, 1.0)
    assert not runtime.within({"CPU": 8}, 4, {"CPU": 2.0}, 1.0)  # no CPU left for the data tasks
    assert runtime.autoscaling_maximum() is None  # the session's Ray does not autoscale

    monkeypatch.setattr(runtime, "autoscaling_maximum", lambda: {"CPU": 64.0, "GPU": 8.0})
    with caplog.at_level("WARNING", logger="hotdog_ray.runtime"):
        runtime.check_capacity(4, {"CPU": 2.0, "GPU": 1.0}, 1.0, keys="train.num_workers")
    assert "autoscales" in caplog.text and "asked 4 x {CPU: 2, GPU: 1}" in caplog.text
    with pytest.raises(ConfigError, match="train.num_workers"):
        runtime.check_capacity(9, {"CPU": 2.0, "GPU": 1.0}, 1.0, keys="train.num_workers")


def test_a_driver_joining_a_cluster_shows_each_worker_line_once(joining_env, tmp_path):
    """A driver that joins a running Ray (RAY_ADDRESS, as under `ray job submit`) gets each line a
    worker writes exactly once. (Nodes started on one machine with a shared --temp-dir each stream
    the other's worker logs too, which doubles them: docs/cluster.md.)"""
    script = tmp_path / "driver.py"
    script.write_text(
        "import logging, ray\n"
        "from hotdog_ray.runtime import init_ray\n"
        "init_ray()\n"
        "@ray.remote(num_cpus=0)\n"
        "def work(i):\n"
        "    print(f'printed-by-worker-{i}', flush=True)\n"
        "    logging.getLogger('hotdog_ray.test').warning('logged-by-worker-%d', i)\n"
        "ray.get([work.remote(i) for i in range(2)])\n"
        "import time; time.sleep(2)  # the log monitor streams worker output every few hundred ms\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], env=joining_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    for i in range(2):
        assert text.count(f"printed-by-worker-{i}") == 1, text[-3000:]
        assert text.count(f"logged-by-worker-{i}") == 1, text[-3000:]


def _count_ray_data_executions(monkeypatch) -> list[str]:
    """Every Ray Data execution this process starts (the loop runs in the driver with num_workers=0)."""
    import ray.data

    started: list[str] = []
    for name in ("iter_batches", "iter_torch_batches", "streaming_split", "materialize"):
        original = getattr(ray.data.Dataset, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            started.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(ray.data.Dataset, name, counted)
    return started


def test_epochs_decode_nothing_and_a_second_fit_decodes_nothing_at_all(
    ray_session, image_tree, tmp_path, monkeypatch
):
    started = _count_ray_data_executions(monkeypatch)
    cfg = tiny_config(tmp_path, str(image_tree.root), "train.num_workers=0", "train.epochs=3")
    first = run_training(cfg, register=False)
    assert len(first.history) == 3
    assert len(started) == 3  # train, validation and test: one execution each for a 3-epoch fit
    files = sum(
        p.is_file() for s in ("train", "validation", "test") for p in (image_tree.root / s).rglob("[!.]*")
    )
    metrics = client(cfg.tracking).get_run(first.run_id).data.metrics
    assert metrics["decoded_images"] == files and metrics["data_executions"] == 3
    assert len(first.skipped) == len(image_tree.bad)  # counted when the cache was built

    started.clear()
    second = run_training(cfg, register=False)
    assert started == []  # every split came from the cache
    metrics = client(cfg.tracking).get_run(second.run_id).data.metrics
    assert metrics["decoded_images"] == 0 and metrics["data_executions"] == 0
    assert second.skipped == first.skipped  # and its bad files are still reported
    assert second.test_metrics["num_images"] == image_tree.good_count("test")


def test_a_split_over_the_memory_share_streams_from_the_cache_and_still_trains(
    ray_session, image_tree, tmp_path, caplog
):
    cfg = tiny_config(
        tmp_path,
        str(image_tree.root),
        "train.num_workers=0",
        "train.epochs=4",
        "data.cache.host_share=0",
        "data.cache.shard_images=4",
    )
    with caplog.at_level("INFO", logger="hotdog_ray.feed"):
        out = run_training(cfg, register=False)
    assert "images of train held in the cache files" in caplog.text
    assert out.history[-1]["loss"] < out.history[0]["loss"]
    # Each class has its own gray level: a model that learnt anything beats chance (1/3) clearly.
    assert out.test_metrics["accuracy"] > 0.6
