"""The `star` command: help, dispatch to the entry points, `star api` options, healthchecks."""
from __future__ import annotations

import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app import cli

SUBCOMMANDS = ["serve", "api", "worker", "convert", "healthcheck"]


def run_star(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_star_help_lists_every_subcommand():
    result = run_star("--help")
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert f"    {name}" in result.stdout


@pytest.mark.parametrize("name", ["serve", "api", "healthcheck"])
def test_own_subcommand_help(name):
    result = run_star(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: star {name}")


@pytest.mark.parametrize("name, module", [("worker", "worker/main.py"), ("convert", "model/convert.py")])
def test_passthrough_subcommand_help(name, module, root):
    result = run_star(name, "--help")
    if (root / module).exists():
        assert result.returncode == 0, result.stderr
        assert "usage" in result.stdout.lower()
    else:  # not written yet: a clear message, not a traceback
        assert result.returncode == 2
        assert f"cannot import {module[:-3].replace('/', '.')}" in result.stderr
        assert "Traceback" not in result.stderr


def test_unknown_subcommand_is_an_error():
    result = run_star("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_cli_imports_neither_torch_nor_model_nor_worker():
    code = ("import sys, app.cli; app.cli.build_parser(); "
            "bad = [m for m in ('torch', 'model', 'worker', 'app.main') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name, target", [("worker", "worker.main"), ("convert", "model.convert")])
def test_passthrough_hands_the_rest_of_argv_to_the_entry_point(name, target, monkeypatch):
    seen = []
    fake = types.ModuleType(target)
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, target, fake)
    assert cli.main([name, "--help", "--model", "tiny"]) == 7
    assert seen == [["--help", "--model", "tiny"]]


def test_missing_torch_names_the_extra(monkeypatch, capsys):
    def fail(name):
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(cli.importlib, "import_module", fail)
    assert cli.main(["worker"]) == 2
    assert "star-service[worker]" in capsys.readouterr().err


def test_api_options_override_star_host_and_port(monkeypatch):
    import uvicorn

    monkeypatch.setenv("STAR_HOST", "127.0.0.1")
    monkeypatch.setenv("STAR_PORT", "8000")
    monkeypatch.setenv("STAR_QUEUE_LIMIT", "7")
    created, served = [], []
    fake = types.ModuleType("app.main")
    fake.create_app = lambda settings: created.append(settings) or "the-app"
    monkeypatch.setitem(sys.modules, "app.main", fake)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    assert cli.main(["api", "--host", "0.0.0.0", "--port", "9123"]) == 0
    (settings,) = created
    assert (settings.host, settings.port, settings.queue_limit) == ("0.0.0.0", 9123, 7)
    ((app, kwargs),) = served
    assert app == "the-app" and kwargs["host"] == "0.0.0.0" and kwargs["port"] == 9123


def test_a_subcommand_is_added_in_one_place(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    @cli.subcommand("hello", "Say hello.", configure=lambda p: p.add_argument("--name"))
    def hello(args, rest):
        return 0 if args.name == "star" else 1

    assert cli.main(["hello", "--name", "star"]) == 0
    assert "hello" in cli.build_parser().format_help()


# --- star healthcheck ---------------------------------------------------------------------


class _Server:
    """A local HTTP server answering every GET with (status, body) set by the test."""

    def __init__(self):
        self.status, self.body = 200, ""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                payload = outer.body.encode()
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()


def enum_metrics(state: str) -> str:
    from prometheus_client import CollectorRegistry, Enum, generate_latest

    registry = CollectorRegistry()
    metric = Enum(cli.WORKER_STATE_METRIC, "Worker state.", registry=registry,
                  states=["starting", "ready", "busy", "draining", "failed"])
    metric.state(state)
    return generate_latest(registry).decode()


@pytest.mark.parametrize("state, ready, alive", [
    ("starting", 1, 0), ("ready", 0, 0), ("busy", 0, 0), ("draining", 1, 0), ("failed", 1, 1)])
def test_worker_healthcheck_follows_the_state(server, state, ready, alive):
    server.body = enum_metrics(state)
    assert cli.main(["healthcheck", "worker", "--url", server.url]) == ready
    assert cli.main(["healthcheck", "worker", "--live", "--url", server.url]) == alive


def test_worker_state_also_read_from_a_state_label():
    text = ('# TYPE star_worker_state gauge\n'
            'star_worker_state{state="ready"} 0\nstar_worker_state{state="busy"} 1\n')
    assert cli.worker_state(text) == "busy"
    assert cli.worker_state("# nothing here\n") is None


def test_worker_healthcheck_reads_star_metrics_port(server, monkeypatch):
    server.body = enum_metrics("ready")
    monkeypatch.setenv("STAR_METRICS_PORT", str(server.httpd.server_port))
    assert cli.main(["healthcheck", "worker"]) == 0


def test_api_healthcheck(server, monkeypatch):
    monkeypatch.setenv("STAR_PORT", str(server.httpd.server_port))
    server.body = '{"status": "ok"}'
    assert cli.main(["healthcheck", "api"]) == 0
    server.status = 500
    assert cli.main(["healthcheck", "api"]) == 1


def test_healthcheck_fails_when_nothing_answers():
    from app.redis_server import free_port

    url = f"http://127.0.0.1:{free_port()}/metrics"
    assert cli.main(["healthcheck", "worker", "--url", url, "--timeout", "1"]) == 1
    assert cli.main(["healthcheck", "worker", "--live", "--url", url, "--timeout", "1"]) == 1
