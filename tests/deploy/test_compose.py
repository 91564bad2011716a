"""docker-compose.yml, its overrides, deploy/env.example, Prometheus and nginx configs agree with
the code: every STAR_* variable is a setting, every command is a `star` subcommand."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

COMPOSE_FILES = ["docker-compose.yml", "deploy/compose.cpu.yml", "deploy/compose.gpu8.yml",
                 "tests/deploy/stack/compose.test.yml"]
ENV_LINE = re.compile(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")


@pytest.fixture(scope="module")
def base(root, yaml_docs):
    (doc,) = yaml_docs(root / "docker-compose.yml")
    return doc


def env_example(root) -> list[tuple[int, bool, str, str]]:
    """(line number, commented out, name, value) for each assignment in deploy/env.example."""
    rows = []
    for number, line in enumerate((root / "deploy/env.example").read_text().splitlines()):
        match = ENV_LINE.match(line)
        if match:
            rows.append((number, bool(match.group(1)), match.group(2), match.group(3)))
    return rows


def services_of_all_files(root, yaml_docs):
    for name in COMPOSE_FILES:
        (doc,) = yaml_docs(root / name)
        for service_name, service in (doc.get("services") or {}).items():
            yield name, service_name, service


def environment_names(service) -> list[str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return [item.split("=", 1)[0] for item in env]
    return list(env)


def test_compose_files_parse(root, yaml_docs):
    for name in COMPOSE_FILES:
        (doc,) = yaml_docs(root / name)
        assert isinstance(doc.get("services"), dict), name


def test_every_star_variable_passed_is_a_setting(root, yaml_docs, unknown_vars):
    for file_name, service_name, service in services_of_all_files(root, yaml_docs):
        assert unknown_vars(environment_names(service)) == [], (file_name, service_name)
    names = [name for _, _, name, _ in env_example(root)]
    assert unknown_vars(names) == [], "deploy/env.example"
    # ${STAR_...} interpolations would be read from the operator's shell, not the settings.
    for name in COMPOSE_FILES:
        assert unknown_vars(re.findall(r"\$\{(STAR_[A-Z0-9_]+)", (root / name).read_text())) == []


def test_misspelled_variable_would_be_caught(unknown_vars, star_env_names):
    assert "STAR_REDIS_URL" in star_env_names
    assert unknown_vars(["STAR_REDIS_URL", "STAR_REDIS_ULR", "PATH"]) == ["STAR_REDIS_ULR"]


def test_env_example_documents_every_setting_and_every_line(root, star_env_names):
    rows = env_example(root)
    lines = (root / "deploy/env.example").read_text().splitlines()
    documented = {name for _, _, name, _ in rows}
    missing = sorted(star_env_names - documented)
    assert missing == [], f"add these settings to deploy/env.example with a comment: {missing}"
    for number, _, name, _ in rows:
        above = lines[number - 1] if number else ""
        assert above.startswith("#") and not ENV_LINE.match(above), \
            f"deploy/env.example: {name} needs a comment line right above it"
    set_names = [name for _, commented, name, _ in rows if not commented]
    assert len(set_names) == len(set(set_names)), "a variable is set twice"


def test_env_example_values_are_valid_settings(root, monkeypatch):
    from app.settings import ApiSettings
    from worker.settings import WorkerSettings

    for _, commented, name, value in env_example(root):
        if name.startswith("STAR_") and not commented:
            monkeypatch.setenv(name, value)
    ApiSettings()
    WorkerSettings()


def test_every_service_runs_an_existing_star_command(root, yaml_docs, command_problem):
    checked = 0
    for file_name, service_name, service in services_of_all_files(root, yaml_docs):
        argv = list(service.get("entrypoint") or []) + list(service.get("command") or [])
        if argv and argv[0] == "star":
            assert command_problem(argv) is None, (file_name, service_name)
            checked += 1
    assert checked >= 4  # api, worker-0, worker-1, convert


def test_stack_shape(base):
    services = base["services"]
    assert {"redis", "api", "proxy", "worker-0", "worker-1", "prometheus"} <= set(services)

    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert any(v.startswith("redis-data:") for v in redis["volumes"])

    api = services["api"]
    assert "container_name" not in api and "ports" not in api, "api must stay scalable"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert set(base["volumes"]) >= {"images", "weights", "redis-data"}


def test_one_worker_per_gpu_pinned(base):
    workers = {n: s for n, s in base["services"].items() if n.startswith("worker-")}
    seen = set()
    for name, service in workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        (gpu,) = device["device_ids"]
        assert name == f"worker-{gpu}" and gpu not in seen
        seen.add(gpu)
        assert "weights:/weights:ro" in service["volumes"]
        assert "images:/data/images" in service["volumes"]
        assert service["environment"]["STAR_STORAGE_DIR"] == "/data/images"
        assert "worker" in service["networks"]["default"]["aliases"]
        assert service["environment"]["STAR_METRICS_HOST"] == "0.0.0.0"   # Prometheus is another container


def test_cpu_override_runs_the_demo_model_without_gpu(root, yaml_docs):
    (doc,) = yaml_docs(root / "deploy/compose.cpu.yml")
    worker = doc["services"]["worker-0"]
    assert worker["environment"]["STAR_MODEL"] == "shapes"
    assert (root / "model/zoo/shapes/config.json").is_file()  # the image copies model/, zoo included
    assert worker["environment"]["STAR_DEVICE"] == "cpu"
    assert worker["deploy"] == {}  # `!reset {}` drops the GPU reservation
    assert worker["build"]["args"]["TORCH_SPEC"].startswith("torch==")
    assert "!reset" in (root / "deploy/compose.cpu.yml").read_text()


def test_prometheus_scrapes_the_api_and_every_worker(root, yaml_docs, base):
    (prom,) = yaml_docs(root / "deploy/prometheus.yml")
    targets = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                targets[name] = sd["port"]
    services = base["services"]
    assert targets["api"] == int(services["api"]["environment"]["STAR_PORT"])
    assert targets["worker"] == int(services["worker-0"]["environment"]["STAR_METRICS_PORT"])
    mounts = [v.split(":")[0] for v in services["prometheus"]["volumes"]]
    assert "./deploy/prometheus.yml" in mounts


def test_proxy_forwards_to_the_api_service(root, base):
    conf = (root / "deploy/nginx.conf").read_text()
    port = base["services"]["api"]["environment"]["STAR_PORT"]
    assert f"http://api:{port}" in conf
    assert "resolver 127.0.0.11" in conf  # re-resolve `api` so --scale is picked up
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in base["services"]["proxy"]["volumes"]


@pytest.mark.parametrize("overrides", [[], ["deploy/compose.cpu.yml"], ["deploy/compose.gpu8.yml"],
                                       ["deploy/compose.cpu.yml", "tests/deploy/stack/compose.test.yml"]],
                         ids=["gpu", "cpu", "gpu8", "test-deploy"])
def test_docker_compose_config_validates(root, compose, overrides):
    files = [arg for f in ["docker-compose.yml", *overrides] for arg in ("-f", f)]
    env = dict(os.environ, DEPLOY_ENV_FILE="deploy/env.example")
    result = subprocess.run([*compose, "--env-file", "deploy/env.example", *files, "config", "-q"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_deployment_test_publishes_on_loopback_only(root, yaml_docs):
    (doc,) = yaml_docs(root / "tests/deploy/stack/compose.test.yml")
    assert all(port.startswith("127.0.0.1:") for port in doc["services"]["proxy"]["ports"])
    assert "!override" in (root / "tests/deploy/stack/compose.test.yml").read_text()


def test_deployment_test_scripts_parse(root):
    for script in sorted((root / "tests/deploy/stack").glob("*.sh")):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script.name, result.stderr)
