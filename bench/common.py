"""Timing helpers shared by the benchmarks: medians of interleaved runs, a measured matmul
peak for MFU, and a plain-text table."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def measure_matmul_peak(n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32,
                        device: str = "cpu") -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul in this process (median of reps): the MFU baseline."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], repeat: int = 1, device: str = "cpu") -> float:
    """Seconds for `repeat` calls of fn."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, calls_per_rep: int = 1,
                        device: str = "cpu") -> dict[str, float]:
    """Median seconds per call of each fn; the fns take turns in every repetition so that load
    from other processes on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        names = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in names:
            times[name].append(time_call(fns[name], calls_per_rep, device) / calls_per_rep)
    return {k: statistics.median(v) for k, v in times.items()}


def issue_seconds(fn: Callable[[], object], device: str = "cpu", reps: int = 3) -> float:
    """Median seconds for the host to return from one call of fn without waiting for the device
    (it waits before and after). On a GPU, a value close to the call's full time means the host
    issuing kernels, not the GPU, sets the pace; on the CPU both time the same work."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        sync(device)
    return statistics.median(times)


def format_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w)
                                  for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
