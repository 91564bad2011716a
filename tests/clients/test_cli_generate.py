"""`star generate` as a user runs it (a subprocess against the live stack), plus the exit codes of
server failures that a healthy stack cannot produce (in-process, mock transport)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from app import cli
from client import cli as cli_generate
from client.waiting import LONG_POLL_S
from app.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


def star(*args: str, cwd: Path, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", "generate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def final_status(stack, job_id: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = stack.client.get(f"/jobs/{job_id}").json()["status"]
        if status not in ("queued", "running"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {status}")


def job_id(stderr: str) -> str:
    return re.search(r"job ([0-9a-f-]{36}) queued", stderr).group(1)


def job_reads(stack) -> dict[str, float]:
    """GET requests the API has answered so far on the job's route and on its event stream."""
    counts = {"/jobs/{job_id}": 0.0, "/jobs/{job_id}/events": 0.0}
    for line in stack.client.get("/metrics").text.splitlines():
        route = re.search(r'^star_api_requests_total\{.*method="GET".*route="([^"]+)"', line)
        if route and route.group(1) in counts:
            counts[route.group(1)] += float(line.split()[-1])
    return counts


def test_generate_saves_numbered_pngs_and_prints_path_seed_size(stack, tmp_path):
    streams = job_reads(stack)["/jobs/{job_id}/events"]
    result = star("a red fox in snow", "-o", "out/fox.png", "--n", "2", "--seed", "7", "--guidance", "3",
                  cwd=tmp_path, env={"STAR_SERVER": stack.url})
    assert result.returncode == 0, result.stderr
    assert job_reads(stack)["/jobs/{job_id}/events"] == streams + 1   # progress from one event stream
    assert result.stdout.splitlines() == ["out/fox-0.png 7 256x256", "out/fox-1.png 8 256x256"]
    for i in range(2):
        image = Image.open(tmp_path / f"out/fox-{i}.png")
        assert image.size == (256, 256) and image.text["seed"] == str(7 + i)
        assert image.text["guidance_scale"] == "3.0"
    assert "scale 10/10" in result.stderr and f"queued on {stack.url}" in result.stderr
    assert re.search(r"queue wait [\d.]+s, model [\d.]+s, total [\d.]+s", result.stderr)
    # what ran: the explicit guidance, tiny's (the global) defaults for the rest
    assert "; guidance 3, top-k 600, top-p 0.8, temperature 1; sampler plain" in result.stderr   # tiny: no head
    assert image.text["sampler"] == "plain"


def test_default_name_comes_from_the_prompt_and_quiet_keeps_stderr_clean(stack, tmp_path):
    before, started = job_reads(stack), time.monotonic()
    result = star("A Lighthouse, at dusk!", "--server", stack.url, "--quiet", cwd=tmp_path)
    took, after = time.monotonic() - started, job_reads(stack)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("a-lighthouse-at-dusk.png ") and result.stderr == ""
    assert (tmp_path / "a-lighthouse-at-dusk.png").is_file()
    # --quiet waits with long-polls: one GET per window used (one unless the machine is very slow), no stream
    gets = after["/jobs/{job_id}"] - before["/jobs/{job_id}"]
    assert 1 <= gets <= 1 + took // LONG_POLL_S
    assert after["/jobs/{job_id}/events"] == before["/jobs/{job_id}/events"]


@pytest.mark.parametrize("args, expect", [
    (["--n", "9"], "`n`: Input should be less than or equal to 4; allowed: an integer from 1 to 4"),
    (["--size", "1024"], "size 1024 is not served; served sizes: 256"),
    (["--sampler", "head"], "rejected the request `sampler` (422 sampler_not_available): sampler 'head' needs a "
                            "model with a sampler head; tiny (size 256) has none"),
])
def test_a_bad_request_exits_2_with_the_servers_message(stack, tmp_path, args, expect):
    result = star("a fox", "--server", stack.url, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert expect in result.stderr and stack.url in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())


def test_an_unknown_sampler_is_a_usage_error_before_any_request(tmp_path):
    result = star("a fox", "--sampler", "fast", "--server", f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --sampler: invalid choice: 'fast' (choose from 'auto', 'head', 'plain')" in result.stderr


def test_an_unreachable_server_exits_3_naming_it(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    result = star("a fox", "--server", down, cwd=tmp_path)
    assert result.returncode == 3
    assert f"cannot reach the STAR server at {down}" in result.stderr and "Traceback" not in result.stderr


def test_a_timeout_exits_4_and_cancels_the_job(stack, tmp_path):
    result = star("a slow one", "--server", stack.url, "--n", "4", "--timeout", "0.3", cwd=tmp_path)
    assert result.returncode == 4, result.stderr
    assert "timed out after 0.3s" in result.stderr and "canceled" in result.stderr
    assert final_status(stack, job_id(result.stderr)) == "canceled"


def test_ctrl_c_cancels_the_job_and_exits_130(stack, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "generate", "interrupt me", "--n", "4",
                                "--server", stack.url], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    first = process.stderr.readline()
    job = job_id(first)
    deadline = time.monotonic() + 30
    while stack.client.get(f"/jobs/{job}").json()["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(30) == 130
    assert f"interrupted; canceled job {job}" in rest and "Traceback" not in rest
    assert final_status(stack, job) == "canceled"


# ------------------------------------------------------------------------------ in-process, mock server

JOB_ID = "6f1c2f1e-8a0e-4c53-9a55-3f3c8a3b9d10"
PARAMS = {"prompt": "a fox", "negative_prompt": "", "size": 256, "n": 1, "seed": 1, "guidance_scale": 4.0,
          "top_k": 600, "top_p": 0.8, "temperature": 1.0}


def run_mocked(handler, tmp_path, *extra: str) -> int:
    args = cli.build_parser().parse_args(["generate", "a fox", "-o", str(tmp_path / "fox.png"),
                                          "--server", "http://star.test", *extra])
    return cli_generate.run(args, transport=httpx.MockTransport(handler))


def test_a_server_error_exits_3(tmp_path, capsys):
    def handler(request):
        return httpx.Response(500, json={"error": {"code": "internal", "message": "boom", "field": None}})
    assert run_mocked(handler, tmp_path) == 3
    assert "the server at http://star.test could not take the request (500 internal): boom" in capsys.readouterr().err


def test_a_failed_job_exits_5_with_its_error(tmp_path, capsys):
    def handler(request):
        if request.method == "POST":
            return httpx.Response(202, json={"id": JOB_ID, "status_url": "x", "queue_position": 0})
        return httpx.Response(200, json={"id": JOB_ID, "status": "failed", "model": "tiny", "request": PARAMS,
                                         "timings": {}, "error": {"code": "model_error", "message": "NaN logits"}})
    assert run_mocked(handler, tmp_path) == 5
    assert f"job {JOB_ID} failed: model_error: NaN logits" in capsys.readouterr().err
    assert not (tmp_path / "fox.png").exists()


def test_sampling_options_are_sent_only_when_given(tmp_path, capsys):
    """Left out, they are the model's defaults (the server fills them): the CLI sends none itself."""
    bodies = []

    def handler(request):
        if request.method == "POST":
            bodies.append(json.loads(request.content))
            return httpx.Response(202, json={"id": JOB_ID, "status_url": "x", "queue_position": 0})
        return httpx.Response(200, json={"id": JOB_ID, "status": "failed", "model": "shapes", "request": PARAMS,
                                         "timings": {}, "error": {"code": "model_error", "message": "x"}})
    run_mocked(handler, tmp_path)
    run_mocked(handler, tmp_path, "--top-k", "0", "--temperature", "0.5", "--sampler", "plain")
    assert bodies[0] == {"prompt": "a fox", "n": 1}
    assert bodies[1] == {"prompt": "a fox", "n": 1, "top_k": 0, "temperature": 0.5, "sampler": "plain"}


def test_webhook_options_are_sent_and_checked(tmp_path, capsys):
    bodies = []

    def handler(request):
        if request.method == "POST":
            bodies.append(json.loads(request.content))
            return httpx.Response(202, json={"id": JOB_ID, "status_url": "x", "queue_position": 0})
        return httpx.Response(200, json={"id": JOB_ID, "status": "failed", "model": "shapes", "request": PARAMS,
                                         "timings": {}, "error": {"code": "model_error", "message": "x"}})
    run_mocked(handler, tmp_path, "--webhook-url", "https://hooks.example.com/star", "--webhook-events",
               "running,final")
    assert bodies[0]["webhook_url"] == "https://hooks.example.com/star"
    assert bodies[0]["webhook_events"] == ["running", "final"]
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["generate", "a fox", "--webhook-events", "done"])
    assert caught.value.code == 2 and "expected `final` or `running,final`" in capsys.readouterr().err


def test_output_names():
    paths = cli_generate.output_paths
    assert paths("fox.png", "p", 1) == [Path("fox.png")]
    assert paths("fox.png", "p", 2) == [Path("fox-0.png"), Path("fox-1.png")]
    assert paths("shots/fox", "p", 1) == [Path("shots/fox.png")]
    assert paths("shots/", "A red fox!", 1) == [Path("shots/a-red-fox.png")]
    assert paths(None, "???", 1) == [Path("star.png")]


def test_on_a_terminal_the_progress_is_one_line_redrawn_in_place():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    line = cli_generate.ProgressLine(stream)
    for job in (SimpleNamespace(status="queued", queue_position=2, progress=None),
                SimpleNamespace(status="running", queue_position=None, progress=SimpleNamespace(scale=5, scales=10)),
                SimpleNamespace(status="running", queue_position=None, progress=SimpleNamespace(scale=10, scales=10))):
        line.update(job)
    line.end()
    assert stream.getvalue().split("\r")[1:] == [
        "queued: 2 jobs ahead", "[############............] scale 5/10", "[########################] scale 10/10\n"]


def test_priority_is_sent_when_given_and_a_refusal_exits_2(tmp_path, capsys):
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        if bodies[-1].get("priority") == "high":
            return httpx.Response(403, json={"error": {"code": "priority_not_allowed", "field": "priority",
                                                       "message": "this API key may not use priority `high`"}})
        return httpx.Response(500, json={"error": {"code": "stop", "message": "x", "field": None}})
    run_mocked(handler, tmp_path, "--priority", "low")
    assert run_mocked(handler, tmp_path, "--priority", "high") == 2
    assert bodies[0]["priority"] == "low" and bodies[-1]["priority"] == "high"
    assert "may not use priority `high`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["generate", "a fox", "--priority", "urgent"])
    assert caught.value.code == 2
