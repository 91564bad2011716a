"""Shared checks for the deployment files: which STAR_* variables exist, which commands exist."""
from __future__ import annotations

import inspect
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


class _PermissiveLoader(yaml.SafeLoader):
    """SafeLoader that also reads Compose's `!reset` / `!override` tags."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_PermissiveLoader.add_multi_constructor("!", _tagged)


def load_yaml(path: Path) -> list:
    """Every document of a YAML file."""
    with path.open() as f:
        return [doc for doc in yaml.load_all(f, Loader=_PermissiveLoader) if doc is not None]


def settings_env_names() -> set[str]:
    """`STAR_FOO` for every field `foo` of every settings class in app/settings.py and worker/settings.py."""
    from pydantic_settings import BaseSettings

    import app.settings
    import worker.settings

    names = set()
    for settings_module in (app.settings, worker.settings):
        for _, cls in inspect.getmembers(settings_module, inspect.isclass):
            if not (issubclass(cls, BaseSettings) and cls.__module__ == settings_module.__name__):
                continue
            prefix = cls.model_config.get("env_prefix", "")
            names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    return names


def unknown_star_variables(names) -> list[str]:
    known = settings_env_names()
    return sorted(n for n in names if n.startswith("STAR_") and n not in known)


def star_command_problem(argv) -> str | None:
    """Why argv is not a valid `star` command line, or None when it is."""
    from app.cli import COMMANDS, build_parser

    if isinstance(argv, str):
        argv = shlex.split(argv)
    argv = list(argv)
    if not argv or argv[0] != "star":
        return f"{argv}: does not run `star`"
    if len(argv) < 2 or argv[1] not in COMMANDS:
        return f"{argv}: unknown subcommand (known: {sorted(COMMANDS)})"
    if COMMANDS[argv[1]].passthrough:
        return None  # its options belong to worker.main / model.convert
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit:
        return f"{argv}: rejected by the `star {argv[1]}` parser"
    return None


def compose_command() -> list[str] | None:
    """`docker compose` (plugin) or a standalone Compose v2, where one is installed."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True)
        if probe.returncode == 0 and "v2." in probe.stdout:
            return [standalone]
    return None


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def yaml_docs():
    return load_yaml


@pytest.fixture(scope="session")
def star_env_names() -> set[str]:
    return settings_env_names()


@pytest.fixture(scope="session")
def unknown_vars():
    return unknown_star_variables


@pytest.fixture(scope="session")
def command_problem():
    return star_command_problem


@pytest.fixture(scope="session")
def compose():
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Docker Compose v2 here (`docker compose version` failed and no "
                    "standalone docker-compose v2 on PATH)")
    return cmd
