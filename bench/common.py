"""Shared pieces of the benchmarks: machine description, the reference matmul, timers, memory, JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable


def emit(record: dict, as_json: bool, stream=None) -> None:
    """One JSON object per line (--json), else a short human line."""
    stream = stream or sys.stdout
    if as_json:
        stream.write(json.dumps(record, sort_keys=False) + "\n")
    else:
        stream.write("  ".join(f"{k}={_short(v)}" for k, v in record.items() if not isinstance(v, (list, dict))) + "\n")
    stream.flush()


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device=None) -> dict:
    """Where a measurement ran: CPU model, cores, torch version, GPU name, date (UTC)."""
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": platform.node(), "python": platform.python_version(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if "torch" in sys.modules or device is not None:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device is not None and torch.device(device).type == "cuda":
            props = torch.cuda.get_device_properties(torch.device(device))
            info["gpu"] = props.name
            info["gpu_memory_bytes"] = props.total_memory
            info["cuda"] = torch.version.cuda
    return info


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = {"name": "wall"}


def set_clock(name: str, device) -> None:
    """What `timed` (and so `matmul_peak`) measures: wall time, or this process's CPU time ("cpu",
    CPU devices only: on a shared machine the other processes' time slices are then not counted,
    in the token stage and in the reference matmul alike)."""
    import torch

    if name not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {name!r}")
    if name == "cpu" and torch.device(device).type != "cpu":
        raise ValueError("--clock cpu measures CPU work only: use it with --device cpu")
    _clock["name"] = name


def timed(fn: Callable, device) -> tuple[object, float]:
    """(fn(), seconds on the clock chosen by set_clock), synchronising the device before and after."""
    clock = CLOCKS[_clock["name"]]
    sync(device)
    t0 = clock()
    out = fn()
    sync(device)
    return out, clock() - t0


def matmul_peak(device, dtype, n: int | None = None, tries: int = 5) -> dict:
    """FLOP/s of one large dense square matmul in this dtype on this device (best of `tries`):
    the machine's practical peak, counted 2*n^3 like every other FLOP count here."""
    import torch

    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=dev, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=dev, dtype=dtype)
    a @ b                                   # warm-up (kernel selection, page faults)
    reps = 10 if dev.type == "cuda" else 1
    best = float("inf")
    for _ in range(tries):
        _, s = timed(lambda: [a @ b for _ in range(reps)], dev)
        best = min(best, s / reps)
    return {"matmul_n": n, "matmul_s": best, "matmul_flops_per_s": 2 * n ** 3 / best}


class PeakMemory:
    """Peak memory of a region: CUDA allocator peak on a GPU, the process's peak RSS on CPU
    (VmHWM, reset through /proc/self/clear_refs where the kernel allows it)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss"

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            for line in open("/proc/self/status", encoding="utf-8"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_int_list(text: str) -> list[int]:
    return [int(x) for x in str(text).replace(" ", "").split(",") if x]
