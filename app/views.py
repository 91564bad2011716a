"""The job record as clients see it (GET /jobs/{id}, the final SSE event, the OpenAI route)."""
from __future__ import annotations

from app.jobs.read import JobState
from app.jobs.states import ACTIVE
from app.schemas import ImageOut, JobParameters, JobView, Progress, Timings, Usage
from app.signing import SignedStorage
from app.storage import Storage


def job_view(state: JobState, storage: Storage | SignedStorage) -> JobView:
    def seconds(a, b):
        return round((b - a).total_seconds(), 3) if a and b else None

    images = None
    if state.images is not None:
        images = [ImageOut(url=storage.url(i["id"]), seed=i["seed"], width=i["width"], height=i["height"])
                  for i in state.images]
    return JobView(
        id=state.id, status=state.status, model=state.model, queue_position=state.queue_position,
        progress=Progress(**state.progress) if state.progress else None,
        cancel_requested=state.cancel_requested and state.status in ACTIVE,
        timings=Timings(queued_at=state.queued_at, started_at=state.started_at, finished_at=state.finished_at,
                        queue_wait_s=seconds(state.queued_at, state.started_at), model_s=state.model_s,
                        total_s=seconds(state.queued_at, state.finished_at)),
        request=JobParameters(**state.params), images=images, prompt_truncated=state.prompt_truncated,
        usage=Usage(**state.usage) if state.usage and state.status == "succeeded" else None, error=state.error,
    )
