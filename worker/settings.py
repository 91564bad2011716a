"""Settings of `star worker` (`STAR_*` environment variables, pydantic-settings; the ones every
process reads come from app.settings.CommonSettings)."""
from __future__ import annotations

from pydantic import Field, model_validator

from app.settings import CommonSettings, worker_metrics_port


class WorkerSettings(CommonSettings):
    """Settings of `star worker`."""

    model: str = Field("shapes", description="Model directory (converted weights), the name of a model shipped in "
                       "`model/zoo` (`shapes`: the 128 px demo model), a preset name such as `tiny` (random "
                       "weights), or `noop[:SIZE[:SCALE_MS]]` (flat grey images, for service benchmarks).")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: str = Field("auto", description="`auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `bfloat16` or `float16`.")
    max_batch: int = Field(8, ge=1, description="Most images run in one model call (a request with n images counts n).")
    max_wait_ms: int = Field(50, ge=0, description="How long the worker waits for more jobs to fill a batch.")
    heartbeat_s: float = Field(10.0, gt=0, description="Worker heartbeat period.")
    metrics_host: str = Field("127.0.0.1", description="Interface the worker's Prometheus /metrics listens on "
                              "(the container images set 0.0.0.0: Prometheus scrapes them over the network).")
    metrics_port: int = Field(9100, ge=0, le=65535, description="Base port of the worker's Prometheus /metrics: a "
                              "worker on `cuda:N` listens on this port + N, so one worker per GPU on a host needs "
                              "no setting (0 disables).")
    name: str | None = Field(None, description="Worker name (default: host + pid).")
    warmup: bool = Field(True, description="Run one small generation after loading, before taking jobs.")
    encode_threads: int = Field(2, ge=1, description="Threads encoding and storing PNGs off the model's critical path.")
    trust_pickle: bool = Field(False, description="Allow loading pickled checkpoints (only files you trust).")
    drain_grace_s: float = Field(90.0, gt=0, description="After SIGTERM, how long the batch in progress may run "
                                 "before its jobs are put back on the queue and the worker exits (at most 15 s "
                                 "later whatever Redis does, worker/stopping.py).")
    max_batch_auto: bool = Field(False, description="On CUDA, size the max batch from the free GPU memory after "
                                 "loading (model/memory.py) instead of STAR_MAX_BATCH, and reserve its KV cache.")
    memory_margin: float = Field(0.1, ge=0, lt=1, description="Fraction of the free GPU memory that "
                                 "STAR_MAX_BATCH_AUTO leaves unused.")
    guidance_stop_scale: int | None = Field(None, ge=0, description="Fast guidance for the requests that leave "
                                            "`guidance_stop_scale` out: the first scale sampled without "
                                            "classifier-free guidance (0 to the model's number of scales, checked "
                                            "at start). Unset: guidance on every scale, the official sampling. "
                                            "Trade-off: docs/api.md, \"Fast guidance\".")
    compile: bool = Field(False, description="torch.compile the per-scale step for batch-size buckets (powers of two "
                          "up to the max batch) and compile them all at start (minutes; CUDA).")

    @model_validator(mode="after")
    def _deadline_after_heartbeat(self) -> "WorkerSettings":
        if self.worker_deadline_s <= self.heartbeat_s:
            raise ValueError(f"worker_deadline_s ({self.worker_deadline_s}) must exceed "
                             f"heartbeat_s ({self.heartbeat_s})")
        return self

    @model_validator(mode="after")
    def _metrics_port_in_range(self) -> "WorkerSettings":
        if self.metrics_listen_port > 65535:
            raise ValueError(f"metrics port {self.metrics_port} + device index of {self.device!r} is above 65535: "
                             "lower STAR_METRICS_PORT")
        return self

    @property
    def metrics_listen_port(self) -> int:
        """The port this worker's /metrics listens on (0: none)."""
        return worker_metrics_port(self.metrics_port, self.device)
