"""The one dispatcher: which implementation of an op runs a call, and where.

An :class:`Implementation` is one way of computing an op (the im2col + GEMM
kernels of today, the deterministic variant of their backward, the NumPy
reference, and the faster kernels to come). It says where it can run (on a
CUDA GPU through CuPy, on the CPU through the host build of its kernels, or on
the CPU as plain NumPy), what it supports (dtypes, and any other condition as
a ``supports(geo)`` function giving the reason it does not apply), whether its
backward is deterministic (free of floating-point atomics), and how its
kernels are launched (kernel file, template parameters, block shape, dynamic
shared memory). Op modules register their implementations at import.

:func:`choose` picks the implementation of a call: the one named by the
caller's ``algorithm=``, or else the registered one of highest priority that
applies; ``deterministic=True`` keeps only deterministic ones, and so does
the automatic choice on the CPU (the host backend runs blocks in parallel:
results are bit-identical from run to run there as with the reference). What NumPy
(and CPU framework) arrays run on is the CPU backend, set by
:func:`set_cpu_backend` or ``$CUPYDCN_CPU_BACKEND``: ``"host"`` (the kernel
source compiled for the CPU, the default when a C++ compiler is found) or
``"reference"`` (the NumPy float64 reference, the fallback and the test
oracle).
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Callable, NamedTuple, Optional, Tuple

from cupydcn import _dtypes, _kernels, _validation

# Where an implementation runs: "cuda" (CuPy on a GPU), "host" (its kernels
# compiled for the CPU), "numpy" (plain NumPy on the CPU).
CUDA, HOST, NUMPY = "cuda", "host", "numpy"
CPU_BACKENDS = ("host", "reference")


class Launch(NamedTuple):
    """How an implementation's kernels are launched (the launch helper's input)."""
    file: str                                  # kernels/<file>.cu
    templates: Tuple[str, ...] = ("T", "I")    # template parameters, in order
    block: Tuple[int, int, int] = (_kernels.BLOCK, 1, 1)
    shared_bytes: int = 0                      # dynamic shared memory per block


class Implementation(NamedTuple):
    """One way of computing an op (see the module docstring).

    ``forward(backend, geo, *arrays)`` and ``backward(backend, geo, *arrays,
    wrt)`` are the op module's kernel paths (for the reference, adapters
    that ignore ``backend``); ``supports(geo)`` returns None when the
    implementation applies to a call, else the reason it does not;
    ``automatic(where, geo)`` says whether the automatic choice may take it
    where it applies (a heuristic of where it is fastest).
    """
    name: str
    op: str
    runs_on: frozenset                 # of CUDA, HOST, NUMPY
    deterministic: bool                # its backward has no floating-point atomics
    forward: Callable
    backward: Callable
    launch: Optional[Launch] = None    # None for the NumPy reference
    dtypes: Optional[frozenset] = None  # dtype names; None: every row of the dtype table
    supports: Optional[Callable] = None
    priority: int = 0                  # the automatic choice takes the highest that applies
    summary: str = ""
    # (where, geo) -> bool: False keeps it out of the automatic choice there
    # (it stays selectable by name); None: automatic wherever it applies.
    automatic: Optional[Callable] = None
    # A dtype name whose tolerance its forward is held to where that is looser
    # than the call's own (TF32 rounds float32 operands to float16's 10-bit
    # mantissa); None: the call's dtype's. Gradients keep the dtype's own.
    forward_tolerance_as: Optional[str] = None

    def forward_tolerance(self, dtype):
        """The relative-norm tolerance of its forward in ``dtype`` (a row of
        the dtype table) against the float64 reference."""
        if self.forward_tolerance_as is None:
            return dtype.tolerance
        other = next(d for d in _dtypes.DTYPES.values() if d.name == self.forward_tolerance_as)
        return max(dtype.tolerance, other.tolerance)


OPS = ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool")
_registry = {op: [] for op in OPS}


def register(implementation):
    """Add ``implementation`` to its op's table (op modules call this at import)."""
    table = _registry[implementation.op]
    if any(i.name == implementation.name for i in table):
        raise _validation.ArgumentError(f"{implementation.op}: implementation "
                                        f"{implementation.name!r} is registered twice")
    table.append(implementation)
    table.sort(key=lambda i: -i.priority)
    return implementation


def implementation(op, name):
    """The registered implementation ``name`` of ``op``."""
    if name is None:
        raise _validation.ArgumentTypeError(f"name must be an implementation of {op}, got None")
    check_algorithm(op, name)
    return next(i for i in _op_table(op) if i.name == name)


def _op_table(op):
    table = _registry.get(op)
    if table is None:
        raise _validation.ArgumentError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    return table


# --------------------------------------------------------------------------
# What this installation can run
# --------------------------------------------------------------------------

def _cupy_importable():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def _compiler():
    """The C++ compiler of the host build, or None."""
    return shutil.which(_kernels.HostBackend().compiler)


def _available(implementation):
    where = implementation.runs_on
    return (NUMPY in where or (HOST in where and _compiler() is not None)
            or (CUDA in where and _cupy_importable()))


def algorithms(op):
    """The names of ``op``'s implementations available in this installation,
    automatic choice first (``op`` is ``"deform_conv2d"``,
    ``"deform_roi_pool"`` or ``"deform_psroi_pool"``)."""
    return tuple(i.name for i in _op_table(op) if _available(i))


# --------------------------------------------------------------------------
# The CPU backend
# --------------------------------------------------------------------------

_cpu_lock = threading.Lock()
_cpu_choice = None    # (name, why) once decided
_host = None


def _default_cpu_backend():
    requested = os.environ.get("CUPYDCN_CPU_BACKEND")
    if requested:
        if requested not in CPU_BACKENDS:
            raise _validation.ArgumentError(
                f"$CUPYDCN_CPU_BACKEND must be one of {', '.join(CPU_BACKENDS)}, "
                f"got {requested!r}")
        return requested, "set by $CUPYDCN_CPU_BACKEND"
    compiler = _compiler()
    if compiler is None:
        return "reference", "no C++ compiler found for the host build of the kernels"
    return "host", f"the default: kernels compiled for the CPU with {compiler}"


def set_cpu_backend(name):
    """Choose what NumPy and CPU framework arrays run on: ``"host"`` (the
    kernel source compiled for the CPU with a C++ compiler, compiled once and
    cached; the default when a compiler is found) or ``"reference"`` (the
    NumPy float64 reference). Returns the previous choice."""
    global _cpu_choice
    if name not in CPU_BACKENDS:
        raise _validation.ArgumentError(
            f"cpu backend must be one of {', '.join(CPU_BACKENDS)}, got {name!r}")
    if name == "host" and _compiler() is None:
        raise _validation.ArgumentError(
            f"cpu backend 'host' needs a C++ compiler; "
            f"{_kernels.HostBackend().compiler!r} was not found")
    with _cpu_lock:
        previous = get_cpu_backend()
        _cpu_choice = (name, "set by cupydcn.set_cpu_backend")
    return previous


def get_cpu_backend():
    """The CPU backend in use, ``"host"`` or ``"reference"``."""
    return cpu_backend_reason()[0]


def cpu_backend_reason():
    """(the CPU backend in use, why it was chosen)."""
    global _cpu_choice
    if _cpu_choice is None:
        _cpu_choice = _default_cpu_backend()
    return _cpu_choice


def host_backend():
    """The process-wide host backend of the user's CPU path (checks off)."""
    global _host
    if _host is None:
        with _cpu_lock:
            if _host is None:
                _host = _kernels.HostBackend(**_kernels.HOST_USER_OPTIONS)
    return _host


# --------------------------------------------------------------------------
# The choice
# --------------------------------------------------------------------------

def _why_not(implementation, where, geo, deterministic):
    """None when ``implementation`` can run this call, else the reason."""
    if where not in implementation.runs_on:
        places = {CUDA: "a CUDA GPU", HOST: "the CPU (host-built kernels)",
                  NUMPY: "the CPU (NumPy)"}
        return (f"it runs on {' or '.join(places[w] for w in sorted(implementation.runs_on))}, "
                f"not on {places[where]}")
    if where == HOST and _compiler() is None:
        return (f"the host build of its kernels needs a C++ compiler; "
                f"{_kernels.HostBackend().compiler!r} was not found")
    if where == CUDA and not _cupy_importable():
        return "it needs CuPy, which is not installed"
    if deterministic and not implementation.deterministic:
        return "its backward is not deterministic (deterministic=True was asked)"
    if implementation.dtypes is not None and geo.dtype.name not in implementation.dtypes:
        return f"it does not support {geo.dtype.name}"
    if implementation.supports is not None:
        return implementation.supports(geo)
    return None


def _place(on_gpu, implementation=None):
    if on_gpu:
        return CUDA
    if implementation is not None:
        return HOST if HOST in implementation.runs_on else NUMPY
    return HOST if get_cpu_backend() == "host" else NUMPY


def check_algorithm(op, algorithm):
    """``algorithm`` must be None or the name of one of ``op``'s registered
    implementations (whether it can run a given call is :func:`choose`'s
    question); the bridges call this when a call is traced."""
    if algorithm is None:
        return
    if not isinstance(algorithm, str):
        raise _validation.ArgumentTypeError(
            f"algorithm must be None or a name (str), got {algorithm!r}")
    if not any(i.name == algorithm for i in _op_table(op)):
        raise _validation.ArgumentError(
            f"algorithm must be None or one of {', '.join(algorithms(op))} "
            f"for {op}, got {algorithm!r}")


def choose(op, on_gpu, geo, algorithm=None, deterministic=False, empty=False):
    """(implementation, backend) for one call of ``op``.

    ``on_gpu``: whether the call's arrays live on a CUDA device; ``geo``: the
    validated geometry; ``algorithm``: None (automatic) or an implementation
    name; ``empty``: the call has no work, so kernels paths run on the no-work
    backend wherever they are (they only allocate their results).
    """
    table = _op_table(op)
    check_algorithm(op, algorithm)
    if empty and not on_gpu and algorithm is None:
        # No work: the kernel path only allocates the empty or zero results,
        # on the no-work backend, whatever the CPU backend (no compiler needed).
        for implementation in table:
            if (implementation.launch is not None
                    and (implementation.deterministic or not deterministic)):
                return implementation, _kernels.NoWorkBackend
    if algorithm is not None:
        implementation = next(i for i in table if i.name == algorithm)
        where = _place(on_gpu, implementation)
        reason = _why_not(implementation, where, geo, deterministic)
        if reason is not None:
            raise _validation.ArgumentError(
                f"algorithm {algorithm!r} cannot run this {op} call: {reason}")
    else:
        where = _place(on_gpu)
        # On the CPU the automatic choice is deterministic: the host backend runs
        # blocks on several cores, where float atomics would add in a different
        # order from run to run (the NumPy reference, the CPU path before the
        # host backend, always gave the same bits; gradcheck's reentrancy test
        # needs them). The gathering backwards need no atomics at all.
        deterministic = deterministic or where == HOST
        candidates = [i for i in table if _why_not(i, where, geo, deterministic) is None
                      and (i.automatic is None or i.automatic(where, geo))]
        if not candidates:
            reasons = "; ".join(f"{i.name}: {_why_not(i, where, geo, deterministic)}"
                                for i in table)
            raise _validation.ArgumentError(
                f"no implementation of {op} can run this call ({reasons})")
        implementation = candidates[0]
    if empty and where != CUDA and implementation.launch is not None:
        return implementation, _kernels.NoWorkBackend
    if where == CUDA:
        return implementation, _kernels.cupy_backend()
    if where == HOST:
        return implementation, host_backend()
    return implementation, None
