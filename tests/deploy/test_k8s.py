"""deploy/k8s: the manifests parse, use only real settings and `star` subcommands, and wire the
GPU workers, probes, KEDA autoscaling and Prometheus the way the code expects."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def manifests(root, yaml_docs) -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted((root / "deploy/k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml_docs(path):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def containers(manifests):
    for (kind, name), obj in manifests.items():
        if kind in ("Deployment", "StatefulSet"):
            for container in obj["spec"]["template"]["spec"]["containers"]:
                yield name, container


def star_containers(manifests):
    for name, container in containers(manifests):
        if (container.get("command") or [None])[0] == "star":
            yield name, container


def test_kustomization_lists_every_manifest(root, yaml_docs):
    (kustomization,) = yaml_docs(root / "deploy/k8s/kustomization.yaml")
    files = {p.name for p in (root / "deploy/k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert kustomization["namespace"] == "star"


def test_everything_lives_in_the_star_namespace(manifests):
    for (kind, name), obj in manifests.items():
        if kind != "Namespace":
            assert obj["metadata"].get("namespace") == "star", (kind, name)


def test_every_star_variable_is_a_setting(manifests, unknown_vars):
    config = manifests[("ConfigMap", "star-config")]["data"]
    assert unknown_vars(config) == []
    assert all(key.startswith("STAR_") for key in config)
    for name, container in star_containers(manifests):
        env_names = [e["name"] for e in container.get("env", [])]
        assert unknown_vars(env_names) == [], name
        assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == ["star-config"]


def test_configmap_values_are_valid_settings(manifests, monkeypatch):
    from app.settings import ApiSettings
    from worker.settings import WorkerSettings

    for key, value in manifests[("ConfigMap", "star-config")]["data"].items():
        monkeypatch.setenv(key, value)
    ApiSettings()
    WorkerSettings()


def test_every_container_runs_an_existing_star_command(manifests, command_problem):
    names = []
    for name, container in star_containers(manifests):
        assert command_problem(container["command"] + container.get("args", [])) is None, name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container.get(probe, {}).get("exec", {}).get("command")
            if command:
                assert command_problem(command) is None, (name, probe)
        names.append(name)
    assert set(names) == {"star-api", "star-worker"}


def test_api_deployment_service_and_probes(manifests):
    api = manifests[("Deployment", "star-api")]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e["value"] for e in container["env"]}
    (port,) = container["ports"]
    assert int(env["STAR_PORT"]) == port["containerPort"] and env["STAR_HOST"] == "0.0.0.0"
    service = manifests[("Service", "star-api")]
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert api["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_worker_gets_one_gpu_and_read_only_weights(manifests):
    worker = manifests[("Deployment", "star-worker")]
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["weights"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["weights"]["persistentVolumeClaim"]["readOnly"] is True
    config = manifests[("ConfigMap", "star-config")]["data"]
    assert config["STAR_MODEL"].startswith(mounts["weights"]["mountPath"] + "/")
    assert mounts["images"]["mountPath"] == config["STAR_STORAGE_DIR"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_images_volume_is_shared_read_write_many(manifests):
    claim = manifests[("PersistentVolumeClaim", "star-images")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("star-api", "star-worker"):
        volumes = manifests[("Deployment", name)]["spec"]["template"]["spec"]["volumes"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v]
        assert "star-images" in claims, name


def test_keda_scales_workers_on_the_rq_queues_of_the_models_lanes(manifests):
    from app.jobs.lanes import lane_names
    from app.jobs.rq_adapter import queue_name

    scaled = manifests[("ScaledObject", "star-worker")]
    assert scaled["apiVersion"].startswith("keda.sh/")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "star-worker"
    triggers = scaled["spec"]["triggers"]
    model = manifests[("ConfigMap", "star-config")]["data"]["STAR_MODEL"]
    # RQ keeps a queue's waiting job ids in the list rq:queue:<name>; the queues are named after
    # the model (a model directory is named by its last path component), one per lane.
    assert [t["metadata"]["listName"] for t in triggers] == [
        "rq:queue:" + name for name in lane_names(queue_name(Path(model).name))]
    redis_url = manifests[("ConfigMap", "star-config")]["data"]["STAR_REDIS_URL"]
    for trigger in triggers:
        assert trigger["type"] == "redis" and trigger["metadata"]["address"] in redis_url
        assert int(trigger["metadata"]["listLength"]) >= 1
    assert scaled["spec"]["minReplicaCount"] >= 1  # keep one model loaded


def test_prometheus_scrapes_annotated_api_and_worker_pods(manifests):
    (prom_yml,) = manifests[("ConfigMap", "star-prometheus")]["data"].values()
    config = yaml.safe_load(prom_yml)
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    config_data = manifests[("ConfigMap", "star-config")]["data"]
    for name, port in (("star-api", "8000"), ("star-worker", config_data["STAR_METRICS_PORT"])):
        annotations = manifests[("Deployment", name)]["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == port
        assert annotations["prometheus.io/path"] == "/metrics"


def test_manifests_match_the_kubernetes_schemas(manifests):
    """Strict schema check where the optional `kubernetes-validate` package is installed."""
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed "
                                   "(pip install kubernetes-validate to check the schemas)")
    version = validate.latest_version()
    for (kind, name), obj in manifests.items():
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no schema in the package
        validate.validate(obj, version, strict=True)
