"""The Dockerfile builds two images (api, worker), each non-root with a HEALTHCHECK running an
existing `star` subcommand, and the API image never gets torch."""
from __future__ import annotations

import json
import re

import pytest


def stages(root) -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, arguments)]}, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (root / "Dockerfile").read_text())
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            current = match.group(1) if match else f"stage{len(result)}"
            result[current] = []
        if current is not None:
            result[current].append((instruction, rest.strip()))
    return result


def exec_form(args: str) -> list[str]:
    return json.loads(args)


@pytest.fixture(scope="module")
def dockerfile(root):
    return stages(root)


def test_two_targets(dockerfile):
    assert {"api", "worker"} <= set(dockerfile)


@pytest.mark.parametrize("target", ["api", "worker"])
def test_target_is_non_root_with_a_healthcheck_and_star_command(dockerfile, target, command_problem):
    instructions = dockerfile[target]
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must end as a non-root USER"
    (healthcheck,) = [args for name, args in instructions if name == "HEALTHCHECK"]
    command = exec_form(healthcheck.split("CMD", 1)[1])
    assert command_problem(command) is None
    assert command[:3] == ["star", "healthcheck", target]
    (cmd,) = [args for name, args in instructions if name == "CMD"]
    assert command_problem(exec_form(cmd)) is None
    assert exec_form(cmd)[:2] == ["star", "api" if target == "api" else "worker"]


def test_api_image_is_slim_python_without_torch(dockerfile, root):
    text = (root / "Dockerfile").read_text()
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", text)
    api = " ".join(args for _, args in dockerfile["api"])
    assert "torch" not in api.replace("'torch' not in sys.modules", "")
    assert "/tmp/api.txt" in api and "worker.txt" not in api
    requirements = " ".join(args for _, args in dockerfile["requirements"])
    api_list = requirements.split("/tmp/api.txt", 1)[1].split("/tmp/worker.txt", 1)[0]
    assert "e['api'] + e['client']" in api_list and "'worker'" not in api_list   # no worker extra


def test_requirement_lists_of_the_requirements_stage(dockerfile, root, tmp_path):
    """The stage's script, run on pyproject.toml: each image gets its extras' pinned requirements
    (boto3 for S3 storage in both), no `star-service[...]` self-reference pip cannot resolve there."""
    import subprocess
    import sys

    from packaging.requirements import Requirement

    (run,) = [args for name, args in dockerfile["requirements"] if name == "RUN"]
    script = re.fullmatch(r'python -c "(.*)"', run, re.DOTALL).group(1)
    for name in ("pyproject.toml", "api.txt", "worker.txt"):
        script = script.replace(f"/tmp/{name}", str(tmp_path / name))
    (tmp_path / "pyproject.toml").write_text((root / "pyproject.toml").read_text())
    subprocess.run([sys.executable, "-c", script], check=True)
    lists = {image: {Requirement(line).name: Requirement(line) for line in
                     (tmp_path / f"{image}.txt").read_text().splitlines()} for image in ("api", "worker")}
    assert {"fastapi", "redis", "rq", "httpx", "boto3"} <= set(lists["api"]) and "torch" not in lists["api"]
    assert {"fastapi", "redis", "rq", "torch", "isal", "boto3"} <= set(lists["worker"])
    assert "star-service" not in set(lists["api"]) | set(lists["worker"])
    assert str(lists["worker"]["boto3"].specifier).startswith("==")


def test_worker_image_uses_a_cuda_pytorch_base_in_the_worker_extra_range(root):
    import tomllib

    from packaging.specifiers import SpecifierSet
    from packaging.requirements import Requirement

    text = (root / "Dockerfile").read_text()
    base = re.search(r"ARG WORKER_BASE=(\S+)", text).group(1)
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-runtime", base)
    assert match, base
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    (torch,) = [Requirement(r) for r in extra if Requirement(r).name == "torch"]
    assert match.group(1) in SpecifierSet(str(torch.specifier))
    assert "/weights" in text and "--constraint /tmp/keep-torch.txt" in text


def test_dockerignore_keeps_the_context_small(root):
    lines = (root / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "data", "tests", "**/__pycache__"} <= ignored
    for needed in ("app", "client", "model", "worker", "pyproject.toml", "README.md"):
        assert needed not in ignored


def test_no_syntax_directive_so_buildkit_pulls_no_frontend_image(root):
    """`# syntax=...` makes BuildKit fetch a frontend image: no build without Docker Hub."""
    for line in (root / "Dockerfile").read_text().splitlines():
        if not line.startswith("#"):
            break   # parser directives only count before the first instruction
        assert not re.match(r"#\s*syntax\s*=", line, re.IGNORECASE), line


@pytest.mark.parametrize("target", ["api", "worker"])
def test_dependencies_are_installed_before_the_source_is_copied(dockerfile, target):
    """Cache-friendly layers: a change to the source (or README.md) reinstalls no dependency."""
    steps = dockerfile[target]
    deps = next(i for i, (name, args) in enumerate(steps) if name == "RUN" and "pip install -r" in args)
    source = next(i for i, (name, args) in enumerate(steps) if name == "COPY" and "--from=source" in args)
    assert deps < source
    before = " ".join(args for name, args in steps[:deps] if name == "COPY")
    assert "README.md" not in before and "--from=requirements" in before


def test_every_package_of_pyproject_is_copied_into_the_images(dockerfile, root):
    """Adding a top-level package: one `COPY <pkg> /src/<pkg>` line in the `source` stage."""
    import tomllib

    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").rstrip(".") for pattern in include}
    copied = {args.split()[0] for name, args in dockerfile["source"] if name == "COPY"}
    assert packages <= copied, f"add COPY lines to the Dockerfile's source stage for {packages - copied}"


def test_worker_image_serves_metrics_on_all_interfaces_and_torch_from_find_links(dockerfile):
    env = " ".join(args for name, args in dockerfile["worker"] if name == "ENV")
    assert "STAR_METRICS_HOST=0.0.0.0" in env   # Prometheus scrapes it from another container
    install = next(args for name, args in dockerfile["worker"] if name == "RUN" and "TORCH_SPEC" in args)
    assert '--find-links "$TORCH_FIND_LINKS"' in install and '--index-url "$TORCH_INDEX_URL"' in install
