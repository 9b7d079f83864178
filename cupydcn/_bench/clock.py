"""Clocks: how time and memory are measured.

A clock has a ``name`` (recorded in the environment), ``time(fn, *,
library, sets, warmup, reps, label)`` returning the milliseconds of each of
``reps`` calls ``fn(i)`` (``i`` the input set, rotated) and ``peak_bytes(fn,
*, library, label)`` returning the most bytes one call ``fn()`` held above
what the library's allocator held before. ``label`` is ``"<runner> <pass>"``
(``"cupydcn fwd"``, ``"cupydcn im2col bwd"``, ``"torchvision fwd+bwd"``).

:class:`CudaClock` measures on the GPU; :class:`FakeClock` makes times up,
so the CPU test tier runs the whole pipeline without measuring anything.
"""

from __future__ import annotations

import gc


class CudaClock:
    """CUDA events around each call, on the stream of the library that runs it.

    ``time`` makes ``warmup`` untimed calls, then ``reps`` calls each between
    two events. ``peak_bytes`` counts outputs and workspace (cuBLAS/cuDNN
    handle workspaces are not the allocator's and are not counted)."""

    name = "CUDA events"

    def __init__(self, torch=None):
        import cupy

        self.cupy = cupy
        self.torch = torch

    def _sync(self, library):
        if library == "torch":
            self.torch.cuda.synchronize()
        else:
            self.cupy.cuda.Device().synchronize()

    def time(self, fn, *, library, sets, warmup, reps, label=""):
        for i in range(warmup):
            fn(i % sets)
        self._sync(library)
        if library == "torch":
            make = lambda: self.torch.cuda.Event(enable_timing=True)  # noqa: E731
            elapsed = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            make = self.cupy.cuda.Event
            elapsed = self.cupy.cuda.get_elapsed_time
        starts = [make() for _ in range(reps)]
        ends = [make() for _ in range(reps)]
        for r in range(reps):
            starts[r].record()
            fn(r % sets)
            ends[r].record()
        ends[-1].synchronize()
        return [float(elapsed(a, b)) for a, b in zip(starts, ends)]

    def peak_bytes(self, fn, *, library, label=""):
        self._sync(library)
        gc.collect()
        if library == "torch":
            torch = self.torch
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            result = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            del result
            return int(peak)
        hook = _cupy_peak_hook(self.cupy)
        with hook:
            result = fn()
            self._sync(library)
        del result
        return int(hook.peak)


def _cupy_peak_hook(cupy):
    """A CuPy memory-pool hook counting the bytes allocated (and not yet
    freed) since it was entered, and their peak."""

    class PeakHook(cupy.cuda.MemoryHook):
        name = "cupydcn_bench_peak"

        def __init__(self):
            self.live, self.now, self.peak = {}, 0, 0

        def malloc_postprocess(self, **kw):
            if kw.get("mem_ptr"):
                self.live[kw["mem_ptr"]] = kw["mem_size"]
                self.now += kw["mem_size"]
                self.peak = max(self.peak, self.now)

        def free_postprocess(self, **kw):
            self.now -= self.live.pop(kw.get("mem_ptr"), 0)

    return PeakHook()


class FakeClock:
    """Made-up times and memory for the CPU test tier: a call of the runner
    whose label starts with a key of ``ms`` takes ``ms[key] * (1 + 0.01*k)``
    for the k-th rep (cupydcn 1 ms, torchvision 2 ms, dense 0.5 ms by
    default), every call holds 3 MiB. It still calls every op, on the first
    and the last input set, and records each label in ``timed``."""

    name = "fake clock"
    MS = {"cupydcn": 1.0, "torchvision": 2.0, "dense": 0.5}

    def __init__(self, ms=None):
        self.ms = dict(self.MS if ms is None else ms)
        self.timed = []

    def time(self, fn, *, library, sets, warmup, reps, label=""):
        self.timed.append(label)
        fn(0)
        fn(sets - 1)
        base = self.ms[label.split()[0]]
        return [base * (1 + 0.01 * k) for k in range(reps)]

    def peak_bytes(self, fn, *, library, label=""):
        fn()
        return 3 * 2**20
