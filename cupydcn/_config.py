"""Process-wide settings: the workspace limit and buffer poisoning for tests."""

from __future__ import annotations

import os

from cupydcn import _validation

_DEFAULT_WORKSPACE = 256 * 2**20
_workspace_limit = int(os.environ.get("CUPYDCN_WORKSPACE_BYTES", _DEFAULT_WORKSPACE))

# When true, every buffer a kernel is meant to fill completely starts as NaN,
# so an element a kernel forgot to write shows up in the tests.
poison = False


def set_workspace_limit(nbytes):
    """Bound the columns buffer of deform_conv2d to ``nbytes`` (default 256 MiB,
    or ``$CUPYDCN_WORKSPACE_BYTES``). The batch, and if one image does not fit,
    its output rows, are processed in chunks that fit; one row of one image is
    the smallest chunk. Returns the previous limit."""
    global _workspace_limit
    nbytes = int(nbytes)
    if nbytes < 1:
        raise _validation.ArgumentError(f"workspace limit must be >= 1 byte, got {nbytes}")
    previous, _workspace_limit = _workspace_limit, nbytes
    return previous


def get_workspace_limit():
    """The current workspace limit in bytes."""
    return _workspace_limit


def empty(xp, shape, dtype):
    """An uninitialised buffer (NaN-filled, -1 for integers, when ``poison`` is set)."""
    out = xp.empty(shape, dtype)
    if poison:
        out.fill(-1 if out.dtype.kind in "iu" else float("nan"))
    return out
