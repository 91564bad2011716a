"""deploy/k8s: the manifests parse, use only real settings and `star` subcommands, and wire the
GPU workers, probes, KEDA autoscaling, Prometheus and the S3 image store the way the code expects;
deploy/k8s-volume (the same stack with a shared images volume) patches them into a valid whole."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def manifests(root, yaml_docs) -> dict[tuple[str, str], dict]:
    return load_manifests(root / "deploy/k8s", yaml_docs)


def load_manifests(folder: Path, yaml_docs) -> dict[tuple[str, str], dict]:
    objects = {}
    for path in sorted(folder.glob("*.yaml")):
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
        config, secret = container["envFrom"]
        assert config["configMapRef"]["name"] == "star-config"
        assert secret["secretRef"] == {"name": "star-s3", "optional": True}   # S3 keys, unless a role


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
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_images_go_to_an_s3_bucket_without_a_shared_volume(manifests):
    from app.storage_s3 import S3Location

    config = manifests[("ConfigMap", "star-config")]["data"]
    assert S3Location.parse(config["STAR_STORAGE_URL"]).prefix and "STAR_STORAGE_DIR" not in config
    assert ("PersistentVolumeClaim", "star-images") not in manifests
    assert ("ServiceAccount", "star") in manifests
    for name in ("star-api", "star-worker"):
        pod = manifests[("Deployment", name)]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == "star"   # a role for the bucket can be bound to it
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert "star-images" not in claims, name


def apply_json_patch(document: dict, operations: list[dict]) -> dict:
    """The RFC 6902 operations kustomize applies (add, remove, replace) to a copy of document."""
    document = copy.deepcopy(document)
    for op in operations:
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
        target = document
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if op["op"] == "remove":
            del target[int(last) if isinstance(target, list) else last]
        elif isinstance(target, list) and last == "-":
            target.append(op["value"])
        else:
            target[int(last) if isinstance(target, list) else last] = op["value"]
    return document


def test_the_shared_volume_variant_mounts_one_read_write_many_volume_everywhere(root, manifests, yaml_docs,
                                                                              monkeypatch):
    from app.settings import ApiSettings
    from worker.settings import WorkerSettings

    folder = root / "deploy/k8s-volume"
    (kustomization,) = yaml_docs(folder / "kustomization.yaml")
    assert kustomization["resources"][0] == "../k8s"
    objects = {**manifests, **load_manifests(folder, yaml_docs)}
    assert set(kustomization["resources"][1:]) == {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    for patch in kustomization["patches"]:
        key = (patch["target"]["kind"], patch["target"]["name"])
        objects[key] = apply_json_patch(objects[key], yaml.safe_load(patch["patch"]))
    claim = objects[("PersistentVolumeClaim", "star-images")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    config = objects[("ConfigMap", "star-config")]["data"]
    assert "STAR_STORAGE_URL" not in config and not any(k.startswith("STAR_S3_") for k in config)
    for name in ("star-api", "star-worker"):
        pod = objects[("Deployment", name)]["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] in volumes
                    and volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == "star-images"]
        assert mount["mountPath"] == config["STAR_STORAGE_DIR"], name
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    assert ApiSettings().image_urls == "local" and WorkerSettings().storage_url is None


@pytest.mark.parametrize("folder", ["deploy/k8s", "deploy/k8s-volume"])
def test_kubectl_builds_both_variants_as_tested_here(root, folder, manifests, yaml_docs):
    """Where kubectl is installed, its kustomize agrees with the patching above."""
    import shutil
    import subprocess

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed")
    built = subprocess.run(["kubectl", "kustomize", str(root / folder)], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    objects = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built) if d}
    config = objects[("ConfigMap", "star-config")]["data"]
    volume = folder.endswith("volume")
    assert ("STAR_STORAGE_DIR" in config) is volume and ("STAR_STORAGE_URL" in config) is not volume
    assert (("PersistentVolumeClaim", "star-images") in objects) is volume
    for name in ("star-api", "star-worker"):
        mounts = [m["mountPath"] for m in objects[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
                  ["volumeMounts"]]
        assert ("/data/images" in mounts) is volume, (folder, name)


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
