"""The Python SDK of the STAR HTTP API and `star generate`: httpx and the standard library only
(`pip install 'star-service[client]'`), no FastAPI, no torch.

    from client import StarClient
    with StarClient("http://localhost:8000") as star:
        star.generate("a red circle on a blue background", seed=7).images[0].save("circle.png")

    client.http    StarClient (sync) and AsyncStarClient (asyncio): submit, get, wait, cancel,
                   models, usage, download, generate
    client.types   the response records, the errors and the retry policy
    client.cli     `star generate` (registered in the `star` command, app/cli.py)

The names below are loaded on first use, so `star` builds its parser (client.cli) without httpx.
"""
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.http import (DEFAULT_SERVER, TERMINAL_STATUSES, Accepted, AsyncStarClient, GeneratedImage,
                             Generation, ImageRef, Job, JobError, JobFailed, JobParameters, KeyUsage, LaneInfo,
                             ModelInfo, Models, Usage, UsageReport,
                             Progress, ProgressCallback, RetryPolicy, StarBusyError, StarClient,
                             StarConnectionError, StarError, StarHTTPError, StarRequestError, StarServerError,
                             StarTimeout, Timings, error_from_response, retry_after_seconds)

__all__ = ["StarClient", "AsyncStarClient", "ProgressCallback", "DEFAULT_SERVER", "TERMINAL_STATUSES",
           "Progress", "ImageRef", "Timings", "JobParameters", "JobError", "Job", "Accepted", "ModelInfo", "LaneInfo",
           "Usage", "KeyUsage", "UsageReport",
           "Models", "GeneratedImage", "Generation", "StarError", "StarConnectionError", "StarHTTPError",
           "StarRequestError", "StarBusyError", "StarServerError", "StarTimeout", "JobFailed",
           "error_from_response", "retry_after_seconds", "RetryPolicy"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from client import http

        return getattr(http, name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
