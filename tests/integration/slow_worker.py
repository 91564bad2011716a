"""`python tests/integration/slow_worker.py`: the real worker (`worker.main.run`) with the real
`tiny` model, slowed by TEST_SCALE_DELAY_MS after each scale so a test can act between scales
(cancel a running job, fill the queue behind a running batch, send SIGTERM mid-batch)."""
import logging
import os
import sys
import time

from worker.main import load_pipeline, parse_settings, run

settings = parse_settings([])
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
pipeline = load_pipeline(settings)
delay_s = float(os.environ.get("TEST_SCALE_DELAY_MS", "200")) / 1000
generate = pipeline.generate


def slow_generate(requests, *, on_scale=None):
    def slowed(k, scales):
        time.sleep(delay_s)
        return on_scale(k, scales) if on_scale else None
    return generate(requests, on_scale=slowed)


pipeline.generate = slow_generate
sys.exit(run(settings, pipeline=pipeline))
