"""`python tests/reliability/faulty_worker.py`: the real worker (`worker.main.run`) serving the
noop pipeline (STAR_MODEL=noop:SIZE), wrapped by fault injection set from the environment:

- TEST_SCALE_DELAY_MS: sleep after every scale (a test can act mid-batch);
  TEST_SLOW_PROMPT: if set, only calls with a prompt containing this word are slowed (and held);
- TEST_HOLD_FILE: while that file exists, a call waits after each scale (a test that must act
  while a batch runs holds it, whatever the machine's speed);
- TEST_OOM_ABOVE=K: torch.OutOfMemoryError for a call of more than K images, and
  TEST_OOM_PROMPT: for any call holding a prompt with this word (an image that never fits);
- TEST_DEVICE_ERROR=1: every call raises CUDA's "illegal memory access" RuntimeError;
- TEST_STOP_AFTER_STORE=1: the process stops itself (SIGSTOP, as a stalled node) right after storing
  its first job's PNGs, before recording the job; SIGCONT resumes it.
"""
import logging
import os
import signal
import sys
import time

from worker.main import load_pipeline, parse_settings, run

settings = parse_settings([])
logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
pipeline = load_pipeline(settings)
generate = pipeline.generate
delay_s = float(os.environ.get("TEST_SCALE_DELAY_MS", "0")) / 1000
slow_word = os.environ.get("TEST_SLOW_PROMPT")
hold = os.environ.get("TEST_HOLD_FILE")
oom_above = int(os.environ.get("TEST_OOM_ABOVE", "0"))
oom_word = os.environ.get("TEST_OOM_PROMPT")
device_error = os.environ.get("TEST_DEVICE_ERROR") == "1"
if oom_above or oom_word:
    import torch


def faulty_generate(requests, *, on_scale=None):
    prompts = [r.prompt for r in requests]
    logging.getLogger("faulty").info("model call with %d images: %s", len(requests), prompts)
    if device_error:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    if (oom_above and len(requests) > oom_above) or (oom_word and any(oom_word in p for p in prompts)):
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(requests)} GiB (injected)")
    slowed_call = slow_word is None or any(slow_word in p for p in prompts)

    def slowed(k, scales):
        time.sleep(delay_s if slowed_call else 0.0)
        stop = on_scale(k, scales) if on_scale else None
        while slowed_call and hold and os.path.exists(hold):
            time.sleep(0.02)
        return stop
    return generate(requests, on_scale=slowed)


pipeline.generate = faulty_generate

if os.environ.get("TEST_STOP_AFTER_STORE") == "1":
    from worker.publish import Publisher

    store = Publisher.store
    stopped = []

    def store_then_stop(self, params, images):
        records = store(self, params, images)
        if not stopped:
            stopped.append(True)
            logging.getLogger("faulty").info("stored %d images; stopping", len(records))
            os.kill(os.getpid(), signal.SIGSTOP)
        return records
    Publisher.store = store_then_stop
sys.exit(run(settings, pipeline=pipeline))
