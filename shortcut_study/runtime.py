"""Device and numeric precision: CUDA when present, bf16 autocast where the hardware does bf16."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError


@functools.cache
def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: where bf16 convolutions run faster than fp32 on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (a worker pinned to its share of the
    cores, a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """One thread per usable CPU, or fewer when `OMP_NUM_THREADS` says so (the convention torch and
    OpenMP follow: e.g. a test runner that runs two test processes on two cores sets it to 1)."""
    cpus = usable_cpus()
    try:
        asked = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return cpus
    return min(asked, cpus) if asked > 0 else cpus


def configure_threads(threads: int = 0) -> int:
    """Intra-op threads for torch: `threads`, or with 0 `default_threads()`. Oversubscribing the
    cores costs far more than it gains (2 threads beside another busy process: 535 -> 211 images/s)."""
    n = threads if threads > 0 else default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def synchronize(self) -> None:
        """Wait for the device's queued work: a timer read without it would time the queue (CUDA
        runs asynchronously), not the work. A no-op on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> str:
        threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
        return f"{self.device} {'bf16' if self.bf16 else 'fp32'}{' channels_last' if self.channels_last else ''}{threads}"


def resolve_runtime(device: str = "auto", precision: str = "auto", channels_last: bool = True,
                    threads: int = 0) -> Runtime:
    configure_threads(threads)
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"train.device={device} but no CUDA device is available — use auto or cpu")
    if precision == "auto":
        bf16 = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu_has_bf16()
    else:
        bf16 = precision == "bf16"
    return Runtime(dev, bf16, channels_last)


def train_runtime(train) -> Runtime:
    """The runtime a `TrainConfig` asks for (device, precision, memory format, threads)."""
    return resolve_runtime(train.device, train.precision, train.channels_last, train.threads)
