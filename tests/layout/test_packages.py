"""The packages say what they are: who may import whom (ENGINEERING.md, docs/architecture.md), no
import cycles, and no module over ~350 lines unless it says why at its top. Read from the source
(ast), so a lazy import inside a function counts as much as one at the top."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "client", "model", "training", "worker")
MAY_IMPORT = {
    "app": {"app"},
    "client": {"client"},
    "model": {"model"},
    "training": {"training", "model"},
    "worker": {"worker", "app", "model"},
}
# The `star` command dispatches to every process's entry point, and `star serve` supervises them
# all (imported lazily, when that subcommand runs).
DISPATCHERS = ("app.cli", "app.serve")
MAX_LINES = 350


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """First-party modules `name` imports (anywhere in the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_packages_import_only_what_they_may(graph):
    wrong = [f"{name} imports {target}" for name, targets in graph.items() if name not in DISPATCHERS
             for target in targets if target.split(".")[0] not in MAY_IMPORT[name.split(".")[0]]]
    assert not wrong, wrong


def test_no_import_cycles(graph):
    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for target in graph.get(node, ()):
                if target == start:
                    return path + [start]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
        return None

    cycles = {" -> ".join(c) for name in graph if (c := cycle_from(name))}
    assert not cycles, sorted(cycles)


def test_modules_stay_short_or_say_why():
    long = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and "Longer than" not in "\n".join(lines[:15]):
            long.append(f"{name}: {len(lines)} lines")
    assert not long, long


def test_the_job_protocol_owns_its_keys():
    """No module outside app/jobs names a `star:` Redis key or writes RQ's records directly."""
    offenders = []
    for name, path in modules().items():
        if name.startswith("app.jobs"):
            continue
        text = path.read_text()
        if re.search(r"""["']star:[a-z]""", text) or ".intermediate_queue_key" in text or "._status" in text:
            offenders.append(name)
    assert not offenders, offenders


def test_the_client_mirrors_the_one_list_of_final_states():
    """client/ installs without the server, so it keeps its own copy of app.jobs.states.FINAL."""
    from app.jobs.states import FINAL
    from client.types import TERMINAL_STATUSES

    assert TERMINAL_STATUSES == frozenset(FINAL)


def test_the_worker_never_reaches_a_webhook_receiver(graph):
    """Webhooks are delivered by API processes only (the GPU never waits on a receiver): nothing the
    worker imports, directly or not, is the deliverer or speaks HTTP as a client."""
    reachable, todo = set(), [name for name in graph if name.split(".")[0] == "worker"]
    while todo:
        name = todo.pop()
        if name not in reachable:
            reachable.add(name)
            todo.extend(graph.get(name, ()))
    assert not reachable & {"app.webhook_delivery", "app.webhook_targets"}
    http_clients = re.compile(r"^\s*(import|from)\s+(httpx|requests|aiohttp|urllib3|urllib\.request|http\.client)\b",
                              re.M)
    paths = modules()
    assert not [name for name in sorted(reachable) if http_clients.search(paths[name].read_text())]
