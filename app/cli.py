"""The `star` command: one entry point for every process of the service.

    star serve        all-in-one for a laptop or a single box: private Redis, the API, one worker
    star api          the HTTP API (uvicorn serving `app.main:create_app`)
    star worker       one GPU/CPU worker (`worker.main:main`)
    star convert      official weights to a model directory (`model.convert:main`)
    star healthcheck  exit 0 when the local api or worker is healthy (container HEALTHCHECKs)

Every process reads its settings from the `STAR_*` environment variables (`app/settings.py`);
options on the command line only override a few of them.

This module imports neither torch nor `model`/`worker` at import time: the API image has no torch.
Each subcommand imports what it needs when it runs. To add a subcommand, write its `run(args,
rest) -> int` function and decorate it with `@subcommand(...)`; nothing else needs to change.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    run: Callable[[argparse.Namespace, list[str]], int]
    configure: Callable[[argparse.ArgumentParser], None] | None = None
    # A passthrough subcommand hands the rest of the command line to its target's own parser
    # (`star worker --help` prints the worker's help).
    passthrough: bool = False


COMMANDS: dict[str, Subcommand] = {}
_HELP_ORDER = ("serve", "api", "worker", "convert")  # then the others, in registration order


def subcommand(name: str, help: str, *, configure: Callable[[argparse.ArgumentParser], None] | None = None,
               passthrough: bool = False) -> Callable:
    """Register `run(args, rest) -> int` as `star NAME`."""
    def register(run: Callable[[argparse.Namespace, list[str]], int]) -> Callable:
        COMMANDS[name] = Subcommand(name, help, run, configure, passthrough)
        return run
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star",
        description="STAR text-to-image service. Settings come from STAR_* environment variables.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ordered = sorted(COMMANDS.values(), key=lambda c: _HELP_ORDER.index(c.name)
                     if c.name in _HELP_ORDER else len(_HELP_ORDER))
    for cmd in ordered:
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help,
                                    add_help=not cmd.passthrough)
        if cmd.configure is not None:
            cmd.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and COMMANDS[argv[0]].passthrough:
        return COMMANDS[argv[0]].run(argparse.Namespace(command=argv[0]), argv[1:])
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args, [])


# --------------------------------------------------------------------------------------------
# Process entry points that live in other packages


def _call_entry_point(target: str, argv: list[str], extra: str) -> int:
    """Import `module:function` lazily and call it with argv; explain a missing install."""
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if missing.split(".")[0] in ("torch", "transformers", "tokenizers", "safetensors", "numpy", "PIL"):
            sys.stderr.write(f"star: {target} needs `{missing}`: install the `{extra}` extra "
                             f"(pip install 'star-service[{extra}]').\n")
        else:
            sys.stderr.write(f"star: cannot import {module_name}: {exc}\n")
        return 2
    return int(getattr(module, func_name)(argv) or 0)


@subcommand("worker", "Run one worker: take jobs from Redis in batches and generate images "
            "(options: `star worker --help`).", passthrough=True)
def run_worker(args: argparse.Namespace, rest: list[str]) -> int:
    return _call_entry_point("worker.main:main", rest, "worker")


@subcommand("convert", "Convert the official STAR weights to a model directory "
            "(options: `star convert --help`).", passthrough=True)
def run_convert(args: argparse.Namespace, rest: list[str]) -> int:
    return _call_entry_point("model.convert:main", rest, "worker")


# --------------------------------------------------------------------------------------------
# star api


def _configure_api(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="interface to bind (overrides STAR_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides STAR_PORT)")


@subcommand("api", "Run the HTTP API.", configure=_configure_api)
def run_api(args: argparse.Namespace, rest: list[str]) -> int:
    if args.host:
        os.environ["STAR_HOST"] = args.host
    if args.port:
        os.environ["STAR_PORT"] = str(args.port)
    try:
        import uvicorn

        from app.main import create_app
        from app.settings import ApiSettings
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"star api needs `{exc.name}`: install the `api` extra (pip install 'star-service[api]').\n")
        return 2

    settings = ApiSettings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=30)
    return 0


# --------------------------------------------------------------------------------------------
# star healthcheck (used by the containers' HEALTHCHECK and Kubernetes exec probes)

# The worker publishes its state (starting, ready, busy, draining, failed) on its Prometheus
# endpoint as this metric: either a prometheus_client Enum (one sample per state, 1 for the current
# one) or a gauge with a `state` label.
WORKER_STATE_METRIC = "star_worker_state"
HEALTHY_WORKER_STATES = ("ready", "busy")
DEAD_WORKER_STATES = ("failed",)  # with --live, every other state (or none) counts as alive


def _configure_healthcheck(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=("api", "worker"), help="which local process to check")
    parser.add_argument("--url", help="override the URL checked (default: from STAR_PORT, or from "
                        "STAR_METRICS_HOST, STAR_METRICS_PORT and STAR_DEVICE; 127.0.0.1 for 0.0.0.0)")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds (default 4)")
    parser.add_argument("--live", action="store_true",
                        help="worker: liveness instead of readiness; only `failed` or no answer "
                        "is unhealthy (starting and draining are alive)")


def worker_state(metrics_text: str) -> str | None:
    """The worker state found in a Prometheus exposition, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        if family.name != WORKER_STATE_METRIC:
            continue
        for sample in family.samples:
            if sample.value == 1:
                state = sample.labels.get("state") or sample.labels.get(WORKER_STATE_METRIC)
                if state:
                    return state
    return None


def _worker_metrics_url(env: Mapping[str, str]) -> str:
    """Where the local worker serves /metrics, by the same settings and port rule it uses."""
    from app.serve import _local
    from app.settings import worker_metrics_port

    port = worker_metrics_port(int(env.get("STAR_METRICS_PORT", "9100")), env.get("STAR_DEVICE", "auto"))
    host = _local(env.get("STAR_METRICS_HOST", "127.0.0.1"))
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


@subcommand("healthcheck", "Exit 0 if the local api (/healthz) or worker (state ready or busy "
            "in its metrics) is healthy, 1 otherwise.", configure=_configure_healthcheck)
def run_healthcheck(args: argparse.Namespace, rest: list[str]) -> int:
    if args.target == "api":
        url = args.url or f"http://127.0.0.1:{os.environ.get('STAR_PORT', '8000')}/healthz"
    else:
        url = args.url or _worker_metrics_url(os.environ)
    try:
        from app.serve import http_get

        status, body = http_get(url, args.timeout)
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
        return 1
    if status != 200:
        print(f"unhealthy: {url} answered {status}")
        return 1
    if args.target == "api":
        print("healthy")
        return 0
    state = worker_state(body)
    healthy = state not in DEAD_WORKER_STATES if args.live else state in HEALTHY_WORKER_STATES
    print(f"{'healthy' if healthy else 'unhealthy'}: worker state {state or 'unknown'}")
    return 0 if healthy else 1


# --------------------------------------------------------------------------------------------
# star serve: Redis + API + one worker on one machine (app/serve.py)


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    from app.serve import configure

    configure(parser)


@subcommand("serve", "Run everything on this machine: a private Redis, the API and one worker.",
            configure=_configure_serve)
def run_serve(args: argparse.Namespace, rest: list[str]) -> int:
    from app.serve import run

    return run(args)


# --------------------------------------------------------------------------------------------
# star generate: a client of a running server (client/cli.py)


def _configure_generate(parser: argparse.ArgumentParser) -> None:
    from client.cli import configure

    configure(parser)


@subcommand("generate", "Generate images on a running server and save them as PNGs.",
            configure=_configure_generate)
def run_generate(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from client.cli import run
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"star generate needs `{exc.name}`: install the `client` extra "
                         "(pip install 'star-service[client]').\n")
        return 2
    return run(args)


def _configure_usage(parser: argparse.ArgumentParser) -> None:
    from client.usage_cli import configure

    configure(parser)


@subcommand("usage", "Show what API keys used on a running server (GET /usage).", configure=_configure_usage)
def run_usage(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        from client.usage_cli import run
    except ModuleNotFoundError as exc:
        sys.stderr.write(f"star usage needs `{exc.name}`: install the `client` extra "
                         "(pip install 'star-service[client]').\n")
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
