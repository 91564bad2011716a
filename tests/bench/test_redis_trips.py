"""bench/redis_trips.py: every job it submits runs, and its counts come out per job."""
from __future__ import annotations

import json

from redis.connection import Connection


def test_redis_trips_counts_round_trips_and_commands_per_job(capsys):
    from bench.redis_trips import main

    send = Connection.send_packed_command
    assert main(["--jobs", "4", "--max-batch", "2", "--json"]) == 0
    assert Connection.send_packed_command is send   # the counter is removed again
    (record,) = [r for r in map(json.loads, (line for line in capsys.readouterr().out.splitlines()
                                              if line.startswith("{"))) if r["kind"] == "redis_trips"]
    assert record["succeeded"] == 4 and record["max_batch"] == 2
    # one POST: at least the admission script and the enqueue transaction; finishing needs a claim
    # and a transaction, starting a WATCH, a read and a transaction
    assert record["post_round_trips_per_job"] >= 2 and record["worker_round_trips_per_job"] >= 5
    assert record["worker_commands_per_job"] > record["worker_round_trips_per_job"]
