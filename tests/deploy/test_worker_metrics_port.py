"""Several workers on one host, with real processes and ports: one per GPU (`--device cuda:N`) all
start with the default settings, each serving /metrics on STAR_METRICS_PORT + N; two that would
share a port stop at once with a message naming the setting; the listener binds STAR_METRICS_HOST
(loopback unless set, all interfaces in the container images)."""
from __future__ import annotations

import socket
import urllib.request

import pytest

from app import cli
from app.redis_server import free_port
from app.settings import worker_metrics_port
from worker.settings import WorkerSettings


def free_port_pair() -> int:
    """A free port whose next port is free too."""
    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def refused(host: str, port: int) -> bool:
    with socket.socket() as client:
        client.settimeout(5)
        return client.connect_ex((host, port)) != 0


@pytest.mark.parametrize("device, port", [("cuda:0", 9100), ("cuda:3", 9103), ("cuda", 9100),
                                          ("cpu", 9100), ("auto", 9100)])
def test_port_rule(device, port):
    assert worker_metrics_port(9100, device) == port
    assert WorkerSettings(device=device).metrics_listen_port == port
    assert worker_metrics_port(0, device) == 0   # 0 still disables


def test_a_port_past_65535_is_refused_at_start():
    with pytest.raises(ValueError, match="lower STAR_METRICS_PORT"):
        WorkerSettings(device="cuda:7", metrics_port=65530)


def test_the_defaults_are_loopback_and_9100():
    settings = WorkerSettings()
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9100)


def workers(worker_process, redis_url, tmp_path, *envs):
    return [worker_process(redis_url, tmp_path / "images", tmp_path / f"worker{i}.log",
                           env={"STAR_MODEL": "noop", "STAR_WARMUP": "false", **env})
            for i, env in enumerate(envs)]


def test_one_worker_per_gpu_each_on_its_own_port(worker_process, redis_url, tmp_path, monkeypatch):
    base = free_port_pair()
    first, second = workers(worker_process, redis_url, tmp_path,
                            {"STAR_DEVICE": "cuda:0", "STAR_METRICS_PORT": str(base)},
                            {"STAR_DEVICE": "cuda:1", "STAR_METRICS_PORT": str(base)})
    with first, second:   # both reach `ready` (before the rule, the second died on port `base`)
        for port in (base, base + 1):
            assert 'star_worker_state{star_worker_state="ready"} 1.0' in scrape("127.0.0.1", port)
        # `star healthcheck worker` finds each worker by the same rule, from its settings
        monkeypatch.setenv("STAR_METRICS_PORT", str(base))
        monkeypatch.setenv("STAR_DEVICE", "cuda:1")
        assert cli.main(["healthcheck", "worker"]) == 0
        assert first.stop() == 0 and second.stop() == 0
        monkeypatch.setenv("STAR_DEVICE", "cuda:0")
        assert cli.main(["healthcheck", "worker", "--timeout", "2"]) == 1


def test_a_taken_port_stops_the_worker_at_once_with_a_clear_message(worker_process, redis_url, tmp_path):
    base = free_port_pair()
    first, second = workers(worker_process, redis_url, tmp_path,
                            {"STAR_DEVICE": "cpu", "STAR_METRICS_PORT": str(base)},
                            {"STAR_DEVICE": "cpu", "STAR_METRICS_PORT": str(base)})
    with first:
        with pytest.raises(AssertionError, match="worker exited with 1"):
            second.start()
        second.stop()
        log = second.log_path.read_text()
        assert f"cannot serve /metrics on 127.0.0.1:{base}" in log and "STAR_METRICS_PORT" in log
        assert "Traceback" not in log
        assert "model noop" in first.log_path.read_text()
        assert "model noop" not in log   # it stopped before loading the model
        assert second.state() is None    # and never joined the worker registry
        assert "ready" in scrape("127.0.0.1", base)   # the first one is untouched


@pytest.mark.parametrize("host, reachable_on_127_0_0_2", [(None, False), ("0.0.0.0", True)],
                         ids=["default-loopback", "all-interfaces"])
def test_metrics_listener_binds_star_metrics_host(worker_process, redis_url, tmp_path, host,
                                                  reachable_on_127_0_0_2):
    """A listener on 127.0.0.1 refuses connections to another local address (127.0.0.2, also
    loopback on Linux); one on 0.0.0.0 accepts them."""
    port = free_port()
    env = {"STAR_METRICS_PORT": str(port), **({"STAR_METRICS_HOST": host} if host else {})}
    (worker,) = workers(worker_process, redis_url, tmp_path, env)
    with worker:
        assert "star_worker_state" in scrape("127.0.0.1", port)
        assert refused("127.0.0.2", port) is not reachable_on_127_0_0_2
