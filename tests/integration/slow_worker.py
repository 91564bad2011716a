"""`python tests/integration/slow_worker.py`: the real worker (`worker.main.run`) with the real
`tiny` model, slowed by TEST_SCALE_DELAY_MS after each scale so a test can act between scales
(cancel a running job, fill the queue behind a running batch, send SIGTERM mid-batch).

TEST_HOLD_FILE: while that file exists, the batch in progress waits after each scale (its progress
recorded); if the file holds a word, only a batch with a prompt containing that word waits. A test
that must act while a batch runs holds it, so that the batch cannot end first on a fast machine or
ahead of a slow test on a busy one."""
import logging
import os
import sys
import time

from worker.main import load_pipeline, parse_settings, run

settings = parse_settings([])
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
pipeline = load_pipeline(settings)
delay_s = float(os.environ.get("TEST_SCALE_DELAY_MS", "200")) / 1000
hold = os.environ.get("TEST_HOLD_FILE")
generate = pipeline.generate


def held(prompts: list[str]) -> bool:
    try:
        with open(hold) as file:  # type: ignore[arg-type]
            word = file.read().strip()
    except (TypeError, FileNotFoundError):
        return False
    return not word or any(word in p for p in prompts)


def slow_generate(requests, *, on_scale=None):
    prompts = [r.prompt for r in requests]

    def slowed(k, scales):
        time.sleep(delay_s)
        stop = on_scale(k, scales) if on_scale else None
        while held(prompts):
            time.sleep(0.02)
        return stop
    return generate(requests, on_scale=slowed)


pipeline.generate = slow_generate
sys.exit(run(settings, pipeline=pipeline))
