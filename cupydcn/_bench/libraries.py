"""How a library runs a case: cupydcn (one runner per algorithm, driven from
the op's spec) and the torch comparison libraries (autograd over the case's
:class:`~cupydcn._bench.cases.Comparison`).

A runner gives ``results(host)`` once, for the correctness gate (every output
and gradient as float64 NumPy, keyed ``out``, ``count``, ``grad_<name>``),
then ``load`` the rotated input sets, ``before(pass)`` outside the timed
calls, ``run(pass, i)`` for the clock and ``unload``.
"""

from __future__ import annotations

import numpy

PASSES = ("fwd", "bwd", "fwd+bwd")
LIBRARIES = ("cupydcn", "torchvision", "dense")   # the table's columns, in order


def to_host64(x):
    """A float64 NumPy copy of a NumPy, CuPy or torch array."""
    if hasattr(x, "detach"):  # torch
        import torch

        return x.detach().to(torch.float64).cpu().numpy()
    if hasattr(x, "get"):
        x = x.get()
    return numpy.asarray(x).astype(numpy.float64)


def rel_err(got, ref):
    """``||got - ref|| / ||ref||``; inf when ``got`` has a non-finite value or
    the shapes differ."""
    got, ref = to_host64(got), to_host64(ref)
    if got.shape != ref.shape or not numpy.all(numpy.isfinite(got)):
        return float("inf")
    scale = numpy.linalg.norm(ref)
    diff = numpy.linalg.norm(got - ref)
    return float(diff / scale) if scale > 0 else float(diff)


def _named(spec, outputs, grads):
    """``{"out": ..., "count": ..., "grad_<name>": ...}`` of a forward's result
    (an array, or a tuple in the order of ``spec.outputs``) and a backward's
    (in the order of ``spec.gradients``), None left out."""
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    found = {"out" if name == "output" else name: v for name, v in zip(spec.outputs, outputs)}
    found.update({f"grad_{name}": g for name, g in zip(spec.gradients, grads) if g is not None})
    return found


def spec_reference(spec, host64, params):
    """The NumPy float64 reference's results of ``spec``'s op on ``host64``
    (the forward's arrays and ``grad_output``) with ``params``."""
    arrays = {name: host64.get(name) for name in spec.arrays}
    bound = spec.bind(**arrays, **params)
    outputs = spec.reference_forward(**bound)
    grads = spec.reference_backward(host64["grad_output"], **bound)
    return _named(spec, outputs, grads)


class Runner:
    """One library running one case in one dtype (see the module docstring)."""

    column = ""        # "cupydcn", "torchvision" or "dense"
    label = ""         # what the table footnote calls it
    library = "cupy"   # whose events and allocator measure it
    reference = ""     # the key of the float64 reference it is held to
    algorithm = None   # cupydcn: the implementation asked for (None: automatic)

    def __init__(self, platform, case, dtype):
        self.platform, self.case, self.dtype = platform, case, dtype
        self.sets = []

    @property
    def key(self):
        """The runner's name in the gate's line and the clock's labels."""
        return self.column if self.algorithm is None else f"{self.column} {self.algorithm}"

    def load(self, host_sets):
        self.sets = [self.prepare(h) for h in host_sets]

    def before(self, which):
        """Set-up for timing pass ``which`` outside the timed calls."""

    def unload(self):
        self.sets = []


class CupydcnRunner(Runner):
    """cupydcn's op of the case (``SPECS[case.op]``) through its public
    functions, with ``algorithm=`` and ``deterministic=`` on the backward.
    The functions are looked up on ``cupydcn`` at each call (what a user
    calls, and what a test patches). Forward outputs the backward takes
    (PS RoI pooling's count) are passed on, as the bridges do."""

    column, library = "cupydcn", "cupy"

    def __init__(self, platform, case, dtype, algorithm=None, deterministic=False):
        super().__init__(platform, case, dtype)
        self.spec = case.spec_of_op
        self.label = f"cupydcn.{self.spec.name}"
        self.reference = case.reference_key
        self.algorithm = algorithm
        self.deterministic = deterministic
        self._kept = {}

    def prepare(self, host):
        return {k: None if v is None else self.platform.to_device(v) for k, v in host.items()}

    def arguments(self, d):
        """The forward's arguments by name (``spec.bind``): the arrays of
        ``d`` and the case's parameters."""
        return self.spec.bind(**{n: d.get(n) for n in self.spec.arrays}, **self.case.params())

    def _forward(self, d):
        import cupydcn

        forward = getattr(cupydcn, self.spec.name)
        return forward(**self.arguments(d), **self.case.forward_options(),
                       algorithm=self.algorithm)

    def _passed_on(self, outputs):
        """The forward's outputs the backward takes (``spec.backward_args``)."""
        if not isinstance(outputs, tuple):
            return {}
        named = dict(zip(self.spec.outputs, outputs))
        return {a.name: named[a.name] for a in self.spec.backward_args if a.name in named}

    def _backward(self, d, passed_on):
        import cupydcn

        backward = getattr(cupydcn, f"{self.spec.name}_backward")
        return backward(d["grad_output"], **self.arguments(d), **passed_on,
                        deterministic=self.deterministic, algorithm=self.algorithm)

    def run(self, which, i):
        d = self.sets[i]
        if which == "fwd":
            return self._forward(d)
        if which == "bwd":
            return self._backward(d, self._kept.get(i, {}))
        out = self._forward(d)
        return out, self._backward(d, self._passed_on(out))

    def before(self, which):
        # backward alone: the forward's outputs it takes, made per input set beforehand
        self._kept = {}
        if which == "bwd" and self.spec.backward_args:
            self._kept = {i: self._passed_on(self._forward(d)) for i, d in enumerate(self.sets)}

    def unload(self):
        self._kept = {}
        super().unload()

    def results(self, host):
        d = self.prepare(host)
        out = self._forward(d)
        grads = self._backward(d, self._passed_on(out))
        return {k: to_host64(v) for k, v in _named(self.spec, out, grads).items()}


class TorchRunner(Runner):
    """A torch comparison library (a case's :class:`Comparison`): forward under
    no_grad, backward by autograd from a graph kept per input set
    (``retain_graph``), forward+backward from scratch."""

    library = "torch"

    def __init__(self, platform, case, dtype, comparison, torch, ops=None):
        super().__init__(platform, case, dtype)
        self.comparison = comparison
        self.column, self.label = comparison.column, comparison.label
        self.reference = comparison.reference
        self.leaves, self.others = comparison.leaves, comparison.others
        self.torch, self.ops = torch, ops
        self.tdtype = getattr(torch, dtype.name)   # torch.float32, torch.bfloat16, ...
        self._graphs = {}

    def _tensor(self, a, grad=False):
        wide = numpy.float64 if a.dtype == numpy.float64 else numpy.float32
        t = self.torch.from_numpy(numpy.ascontiguousarray(a, dtype=wide))
        t = t.to(device=self.platform.torch_device, dtype=self.tdtype)
        return t.requires_grad_(grad)

    def prepare(self, host):
        leaves = {k: self._tensor(host[k], True) for k in self.leaves if host.get(k) is not None}
        others = {k: self._tensor(host[k]) for k in self.others if host.get(k) is not None}
        return {**leaves, **others, "grad_output": self._tensor(host["grad_output"])}

    def _forward(self, d):
        return self.comparison.forward(self.torch, self.ops, self.case, d)

    def _leaves(self, d):
        return [d[k] for k in self.leaves if k in d]

    def _grads(self, out, d, retain=False):
        return self.torch.autograd.grad(out, self._leaves(d), d["grad_output"],
                                        retain_graph=retain)

    def run(self, which, i):
        d = self.sets[i]
        if which == "fwd":
            with self.torch.no_grad():
                return self._forward(d)
        if which == "bwd":
            return self._grads(self._graphs[i], d, retain=True)
        return self._grads(self._forward(d), d)

    def before(self, which):
        # backward alone: one forward graph per input set, kept (retain_graph)
        self._graphs = {i: self._forward(d) for i, d in enumerate(self.sets)} \
            if which == "bwd" else {}

    def unload(self):
        self._graphs = {}
        super().unload()

    def results(self, host):
        d = self.prepare(host)
        out = self._forward(d)
        grads = self._grads(out, d)
        found = {"out": out}
        found.update({f"grad_{k}": g for k, g in zip([k for k in self.leaves if k in d], grads)})
        return {k: to_host64(v) for k, v in found.items()}


def make_ops(case, dtype, platform, baselines, deterministic=False, algorithms=(None,)):
    """The runners of ``case``: cupydcn once per algorithm (None: the automatic
    choice), then each comparison library the baselines provide."""
    ops = [CupydcnRunner(platform, case, dtype, algorithm, deterministic)
           for algorithm in algorithms]
    for comparison in case.comparisons():
        module = baselines.ops if comparison.needs == "torchvision" else baselines.torch
        if module is not None:
            ops.append(TorchRunner(platform, case, dtype, comparison, baselines.torch,
                                   baselines.ops))
    return ops
