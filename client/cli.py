"""`star generate PROMPT`: submit to a running STAR server, show progress, save the PNGs.

    star generate "a red circle on a blue background" -o circle.png --n 2 --seed 7
    circle-0.png 7 128x128
    circle-1.png 8 128x128

stdout: one line per saved image, `PATH SEED WxH` (for scripts). stderr: the job id, a progress
bar (queue position, then scale k of S) and the timings. `-o NAME.png` with n > 1 saves
NAME-0.png, NAME-1.png, ...; without -o the name comes from the prompt.
Progress comes from the job's event stream; with --quiet the command long-polls instead (one
request, answered when the job ends). --webhook-url also has the server call a URL when it ends.

Exit codes (EXIT_*): 0 saved; 2 the server rejected the request (4xx, its message is shown);
3 server error or unavailable (5xx, connection refused, queue still full after the retries);
4 the job did not finish within --timeout (it is canceled); 5 the job failed, was canceled or
expired; 130 interrupted by Ctrl-C (the job is canceled first).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import TextIO

EXIT_OK, EXIT_BAD_REQUEST, EXIT_SERVER, EXIT_TIMEOUT, EXIT_JOB, EXIT_INTERRUPTED = 0, 2, 3, 4, 5, 130
SAMPLERS = ("auto", "head", "plain")   # POST /generate's `sampler` (checked again by the server)
HELP = "Generate images on a running STAR server and save them as PNGs (see `star generate --help`)."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Submit a prompt to a STAR server, show its progress and save the images. Exit "
                          "codes: 0 ok, 2 bad request, 3 server error/unavailable, 4 timeout, 5 job "
                          "failed/canceled/expired, 130 interrupted (the job is canceled).")
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("-o", "--output", help="PNG path (default: from the prompt); with --n > 1, "
                        "NAME.png becomes NAME-0.png, NAME-1.png, ...; a directory keeps the default name")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the largest served)")
    parser.add_argument("--n", "-n", type=int, default=1, help="number of images, 1-4; image i uses seed (seed + i) mod 2^32")
    parser.add_argument("--seed", type=int, help="seed of the first image (default: chosen by the server)")
    parser.add_argument("--negative-prompt", help="what to steer away from")
    parser.add_argument("--guidance-scale", "--guidance", type=float,
                        help="classifier-free guidance (default: the model's, see GET /models)")
    parser.add_argument("--top-k", type=int, help="top-k sampling, 0 = off (default: the model's)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling, 0 = off (default: the model's)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the model's)")
    parser.add_argument("--guidance-stop-scale", type=int, metavar="INDEX",
                        help="fast guidance: the first scale sampled without guidance, 0 to the model's number of "
                        "scales (10 at 256/512 px, 14 at 1024 px; that number = guidance on every scale); faster, "
                        "may follow the prompt less closely (default: the worker's, usually guidance on every scale)")
    parser.add_argument("--sampler", choices=SAMPLERS,
                        help="auto (default: the model's sampler head where it has one, else plain), head "
                        "(causal-driven stable sampling; only models with a sampler head) or plain")
    parser.add_argument("--priority", choices=("high", "normal", "low"), help="the job's lane: workers take high "
                        "jobs first, then normal (the default), then low; high only for the API keys the "
                        "server allows (STAR_HIGH_PRIORITY_KEYS)")
    parser.add_argument("--server", help="base URL of the API (default: $STAR_SERVER or http://localhost:8000)")
    parser.add_argument("--api-key", help="API key, sent as a Bearer token (default: $STAR_API_KEY; "
                        "prefer the variable, command lines are visible to other users)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the job before canceling it (exit 4); default 600")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress or timings on stderr (the "
                        "command then long-polls the job instead of following its events)")
    parser.add_argument("--webhook-url", help="also have the server POST a signed event to this URL when the "
                        "job ends (docs/api.md#webhooks)")
    parser.add_argument("--webhook-events", type=_events, help="with --webhook-url: `final` (the default) or "
                        "`running,final` (also when a worker starts the job)")


def _events(text: str) -> list[str]:
    events = [part.strip() for part in text.split(",") if part.strip()]
    if not events or any(event not in ("running", "final") for event in events):
        raise argparse.ArgumentTypeError(f"expected `final` or `running,final`, not {text!r}")
    return events


def output_paths(output: str | None, prompt: str, n: int) -> list[Path]:
    default = (re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].strip("-") or "star") + ".png"
    if output is None:
        path = Path(default)
    elif output.endswith(("/", os.sep)) or Path(output).is_dir():
        path = Path(output) / default
    else:
        path = Path(output)
        if path.suffix.lower() != ".png":
            path = path.with_name(path.name + ".png")
    if n <= 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


class ProgressLine:
    """One status line on stderr: redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self, stream: TextIO, enabled: bool = True):
        self.stream, self.enabled = stream, enabled
        self.tty = enabled and stream.isatty()
        self.width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, job) -> None:
        if job.status == "queued":
            ahead = job.queue_position or 0
            self.show(f"queued: {ahead} job{'s' if ahead != 1 else ''} ahead" if ahead else "queued: next")
        elif job.status == "running" and job.progress:
            k, scales = job.progress.scale, job.progress.scales
            filled = round(24 * k / scales) if scales else 0
            self.show(f"[{'#' * filled}{'.' * (24 - filled)}] scale {k}/{scales}")
        elif job.status == "running":
            self.show("running")

    def end(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0


def run(args: argparse.Namespace, *, transport=None) -> int:
    from client.http import DEFAULT_SERVER, StarClient

    server = (args.server or os.environ.get("STAR_SERVER") or DEFAULT_SERVER).rstrip("/")
    api_key = args.api_key or os.environ.get("STAR_API_KEY") or None
    paths = output_paths(args.output, args.prompt, args.n)
    progress = ProgressLine(sys.stderr, enabled=not args.quiet)
    with StarClient(server, api_key, transport=transport) as client:
        try:
            return _generate(client, args, paths, progress)
        except KeyboardInterrupt:
            progress.end()
            print("star generate: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def _generate(client, args: argparse.Namespace, paths: list[Path], progress: ProgressLine) -> int:
    from client.http import StarError, StarTimeout

    options = {"negative_prompt": args.negative_prompt, "size": args.size, "n": args.n, "seed": args.seed,
               "guidance_scale": args.guidance_scale, "top_k": args.top_k, "top_p": args.top_p,
               "temperature": args.temperature, "guidance_stop_scale": args.guidance_stop_scale,
               "sampler": args.sampler, "priority": args.priority, "webhook_url": args.webhook_url,
               "webhook_events": args.webhook_events}
    started = time.monotonic()
    try:
        accepted = client.submit(args.prompt, **options)
    except StarError as exc:
        return _report(exc, client.server)
    _note(args, f"star generate: job {accepted.id} queued on {client.server}")
    try:
        job = client.wait(accepted.id, timeout=args.timeout, poll_s=0.25,
                          on_progress=None if args.quiet else progress.update)
    except KeyboardInterrupt:
        progress.end()
        _cancel(client, accepted.id)
        print(f"star generate: interrupted; canceled job {accepted.id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StarTimeout as exc:
        progress.end()
        _cancel(client, accepted.id)
        print(f"star generate: timed out after {args.timeout:g}s: job {accepted.id} was still "
              f"{exc.job.status}; it was canceled", file=sys.stderr)
        return EXIT_TIMEOUT
    except StarError as exc:
        progress.end()
        return _report(exc, client.server)
    progress.end()
    if job.status != "succeeded":
        detail = f": {job.error.code}: {job.error.message}" if job.error else ""
        print(f"star generate: job {job.id} {job.status}{detail}", file=sys.stderr)
        return EXIT_JOB
    try:
        for path, image in zip(paths, job.images):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(client.download(image))
            print(f"{path} {image.seed} {image.width}x{image.height}", flush=True)
    except StarError as exc:
        return _report(exc, client.server)
    t, r = job.timings, job.request
    ran = ([f"guidance {r.guidance_scale:g}, top-k {r.top_k}, top-p {r.top_p:g}, temperature {r.temperature:g}"]
           if None not in (r.guidance_scale, r.top_k, r.top_p, r.temperature) else [])
    ran += [f"sampler {r.sampler}"] if r.sampler else []
    ran += [f"no guidance from scale {r.guidance_stop_scale}"] if r.guidance_stop_scale is not None else []
    _note(args, f"star generate: job {job.id} on {job.model}: queue wait {_s(t.queue_wait_s)}, model "
                f"{_s(t.model_s)}, total {_s(t.total_s)} (with downloads {time.monotonic() - started:.2f}s)"
                + "".join(f"; {part}" for part in ran))
    return EXIT_OK


def _report(exc: Exception, server: str) -> int:
    """Print what went wrong and return its exit code."""
    from client.http import StarConnectionError, StarHTTPError, StarRequestError

    if isinstance(exc, StarRequestError):
        where = f" `{exc.field}`" if exc.field else ""
        print(f"star generate: the server at {server} rejected the request{where} ({exc.status} {exc.code}): "
              f"{exc.message}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    if isinstance(exc, StarHTTPError):   # 5xx, or 429 after every retry
        print(f"star generate: the server at {server} could not take the request ({exc.status} {exc.code}): "
              f"{exc.message}", file=sys.stderr)
        return EXIT_SERVER
    if isinstance(exc, StarConnectionError):
        print(f"star generate: {exc} (is the server running? set --server or STAR_SERVER)", file=sys.stderr)
        return EXIT_SERVER
    print(f"star generate: {exc}", file=sys.stderr)
    return EXIT_SERVER


def _cancel(client, job_id: str) -> None:
    from client.http import StarError

    try:
        client.cancel(job_id)
    except StarError as exc:
        print(f"star generate: could not cancel job {job_id}: {exc}", file=sys.stderr)


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _s(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.2f}s"
