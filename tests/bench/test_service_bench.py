"""bench.service with a handful of requests on the no-op model: a real Redis, API and worker."""
from __future__ import annotations

import json

from bench import service


def test_service_bench_on_noop(capsys, tmp_path):
    out = tmp_path / "service.jsonl"
    assert service.main(["--models", "noop", "--requests", "20", "--concurrency", "4", "--sequential", "3",
                         "--json", "--out", str(out), "--plot", str(tmp_path / "s.png")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kind"] for r in lines] == ["machine", "service"]
    rec = lines[1]
    assert (rec["model"], rec["requests"], rec["concurrency"], rec["offered_per_s"]) == ("noop", 20, 4, None)
    assert rec["statuses"] == {"202": 20} and rec["completed"] == rec["succeeded"] == 20
    assert rec["post_per_s"] > 0 and 0 < rec["submit_p50_ms"] <= rec["submit_p99_ms"] <= rec["submit_max_ms"]
    assert rec["e2e_p50_ms"] <= rec["e2e_p99_ms"]
    assert rec["sequential_jobs"] == 3 and rec["overhead_p50_ms"] > 0
    assert set(rec["cpu_s_during_posts"]) == {"api", "worker", "redis", "bench_client"}
    assert rec["sequential_e2e_p50_ms"] >= rec["overhead_p50_ms"]
    assert json.loads(out.read_text()) == rec
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_service_bench_open_loop_paces_the_posts(capsys):
    """--rate: 30 POSTs offered at 60/s take about half a second, not as fast as the API answers."""
    assert service.main(["--models", "noop", "--requests", "30", "--concurrency", "4", "--sequential", "1",
                         "--rate", "60", "--json"]) == 0
    rec = [json.loads(line) for line in capsys.readouterr().out.splitlines()][1]
    assert rec["offered_per_s"] == 60 and rec["statuses"] == {"202": 30}
    assert rec["post_wall_s"] >= 29 / 60        # the last POST is due at 29/60 s
