"""What a device error means for the worker.

- Out of memory (`torch.OutOfMemoryError`; `torch.cuda.OutOfMemoryError` is the same class): the
  batch was too large; the runner splits it and retries (nothing is wrong with the device).
- An error after which the CUDA context is unusable (illegal memory access, device-side assert,
  launch failure, ECC error): every later call would fail too. The worker gives its batch back to
  the queue and exits non-zero so that its supervisor starts a fresh process.
torch is never imported here: a pipeline that raises torch's errors has imported it already.
"""
from __future__ import annotations

import gc
import sys
from dataclasses import dataclass

FATAL_MARKERS = (
    "illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
    "uncorrectable ecc error", "illegal instruction", "cuda error: unknown error", "launch timed out",
    "cublas_status_execution_failed", "cudnn_status_execution_failed", "device not ready",
)


class DeviceFailure(Exception):
    """The device is unusable after this error: the worker must be replaced."""


@dataclass(frozen=True)
class DoesNotFit:
    """Result of one image that ran out of device memory even alone."""

    message: str
    canceled: bool = False


def is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def is_fatal_device_error(exc: BaseException) -> bool:
    if not isinstance(exc, RuntimeError) or is_oom(exc):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in FATAL_MARKERS)


def free_device_memory() -> None:
    """Return cached blocks after an out-of-memory error (CUDA only)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
