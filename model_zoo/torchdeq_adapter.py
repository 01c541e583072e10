"""Bring a DEQ written with torchdeq into deqbench's DEQ protocol (``model_zoo/protocol.py``).

torchdeq's convention (``get_deq`` / ``apply_norm`` / ``reset_norm``)::

    class MyDEQ(nn.Module):
        def __init__(self):
            super().__init__()
            self.injection = nn.Conv2d(1, 16, 3, 2, 1)      # x -> u
            self.cell = Cell()                              # f(z, u), z shaped like u
            self.head = nn.Sequential(...)                  # z* -> logits
            apply_norm(self.cell, "weight_norm")
            self.deq = get_deq(f_solver="broyden", f_max_iter=8, f_tol=1e-3, f_stop_mode="rel")

        def forward(self, x):
            u = self.injection(x)
            reset_norm(self.cell)
            z, info = self.deq(lambda z: self.cell(z, u), torch.zeros_like(u))
            return self.head(z[-1])

becomes a DEQ-aware deqbench model with ::

    model = TorchDEQClassifier(MyDEQ(), input_shape=(1, 28, 28), num_classes=10)

(``injection=``, ``cell=``, ``head=``, ``deq=`` name the attributes when they are called
differently).  The harness then runs the fixed point itself, with :mod:`model_zoo.solvers`
configured from the torchdeq DEQ (``f_solver``, ``eval_f_max_iter`` = N, ``f_tol``,
``f_stop_mode``), so every state z[1..N] is observable.

How the harness's states relate to torchdeq's own solver iterates (z[0] = 0 in both):

* ``broyden`` -> :class:`~model_zoo.solvers.Broyden`: the same "good Broyden" update; z[t] is
  torchdeq's iterate after t steps, which torchdeq's ``indexing`` stores under index t + 1
  (``tests/test_solvers.py`` checks the iterates and residual traces to 1e-10).
* ``fixed_point_iter`` -> :class:`~model_zoo.solvers.FixedPoint`: z[t] = f^t(0), torchdeq's t-th
  ``fx``; torchdeq attributes the residual ||f^t - f^(t-1)|| to f^t, the harness attributes
  ||f(z[t]) - z[t]|| to z[t] (one f-step later), so "lowest residual" may pick z[t] one step apart.
* ``anderson`` -> :class:`~model_zoo.solvers.Anderson` (torchdeq does not record its first two steps).
* Stopping: torchdeq stops the whole batch when the batch maximum of the residual is below
  ``f_tol``; the harness stops each sample on its own residual (batch-invariant results).  With no
  sample converged before N both pick the same lowest-residual state per sample, so the default
  reported forward h(z*) equals torchdeq's eval forward ``head(deq(f, z0)[0][-1])`` at the same N
  (``tests/test_byo.py`` checks it on a trained model).

The default reported forward is torchdeq's: the head on the solver's lowest-residual state, no
extra f-step (``FinalState(steps=0, first_full=False)``).  Attacks differentiate surrogates
(phantom unrolls of f, Eq. 11), never the solve.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .forward import FinalState, make_defense
from .mdeq import FEvalCounter, FEvalTotals, check_input
from .solvers import Anderson, Broyden, FixedPoint, Solver

__all__ = ["TorchDEQClassifier", "solver_from_torchdeq", "TORCHDEQ_SOLVERS"]

#: torchdeq solver function name -> harness solver class.
TORCHDEQ_SOLVERS = {"broyden_solver": Broyden, "broyden": Broyden,
                    "fixed_point_iter": FixedPoint, "simple_fixed_point_iter": FixedPoint,
                    "anderson_solver": Anderson, "anderson": Anderson}


def solver_from_torchdeq(deq, max_iter: Optional[int] = None) -> Solver:
    """The harness solver equivalent to a torchdeq DEQ's forward solver at test time.

    ``deq``: a module from ``torchdeq.get_deq`` (reads ``f_solver``, ``eval_f_max_iter``,
    ``f_tol``, ``f_stop_mode``).  ``protect`` is off (torchdeq has no divergence guard)."""
    fn = getattr(deq, "f_solver", None)
    name = getattr(fn, "__name__", str(fn))
    if name not in TORCHDEQ_SOLVERS:
        raise ValueError(f"torchdeq solver {name!r} has no harness equivalent "
                         f"(known: {sorted(TORCHDEQ_SOLVERS)})")
    n = max_iter or int(getattr(deq, "eval_f_max_iter", 0) or getattr(deq, "f_max_iter", 8))
    return TORCHDEQ_SOLVERS[name](max_iter=n, eps=float(getattr(deq, "f_tol", 1e-3)),
                                  stop_mode=getattr(deq, "f_stop_mode", "abs"), protect=None)


class _Context:
    """One batch's f_theta(.; x) on flat states (b, D) (the protocol's DEQContext)."""
    masks = None   # torchdeq's variational dropout lives inside the cell (reset per forward)

    def __init__(self, model: "TorchDEQClassifier", x: Tensor, counter: FEvalCounter):
        self.model, self.counter = model, counter
        self.set_input(x)

    def set_input(self, x: Tensor) -> None:
        self.x = x
        self.inj = self.model.inject(x)
        self.model._state_shape = tuple(self.inj.shape[1:])

    def f(self, z: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        inj = self.inj if idx is None else self.inj.index_select(0, idx)
        self.counter.add(idx, torch.is_grad_enabled() and (z.requires_grad or inj.requires_grad))
        m = self.model
        return m.flatten(m.cell_module(m.unflatten(z), inj))

    def head(self, z: Tensor) -> Tensor:
        return self.model.head_module(self.model.unflatten(z))


class _CellView:
    """``model.cell`` as the Sec. 3.2 code calls it: f with the state fixed, a function of the
    injection only (what Eq. 8 differentiates)."""

    def __init__(self, model: "TorchDEQClassifier"):
        self._model = model

    def with_fixed_state(self, z: Tensor, masks=None):
        cell = self._model.cell_module
        return lambda inj: cell(z, inj)

    def __call__(self, z, inj, masks=None):
        return self._model.cell_module(z, inj)


class TorchDEQClassifier(nn.Module):
    """A DEQ written with torchdeq conventions, as a protocol-satisfying deqbench model.

    Args:
        net: the user's module holding the three parts (its state_dict keys are kept under
            ``net.``; a checkpoint of ``net`` itself loads too).
        injection, cell, head: attribute names in ``net`` of u = injection(x) (B, *S),
            z_next = cell(z, u) with z (B, *S) (the state has the injection's shape, torchdeq's
            ``z0 = torch.zeros_like(u)``) and logits = head(z) (B, K).
        deq: attribute name of the ``torchdeq.get_deq`` module the solver is read from
            (:func:`solver_from_torchdeq`), or None with ``solver=`` given.
        solver: a harness solver overriding the one read from ``deq``.
        input_shape: (C, H, W) of the [0, 1] images; num_classes: K.
        defense: the reported forward (default: torchdeq's eval forward h(z*)).
    """
    is_deq = True

    def __init__(self, net: nn.Module, *, input_shape: Sequence[int], num_classes: int,
                 injection: str = "injection", cell: str = "cell", head: str = "head",
                 deq: Optional[str] = "deq", solver: Optional[Solver] = None, defense=None,
                 architecture: Optional[str] = None):
        super().__init__()
        for what, attr in (("injection", injection), ("cell", cell), ("head", head)):
            if not callable(getattr(net, attr, None)):
                raise TypeError(f"{type(net).__name__} has no callable attribute {attr!r} "
                                f"(pass {what}='<attribute name>')")
        self.net = net
        self._parts = (injection, cell, head)
        if solver is None:
            d = getattr(net, deq, None) if deq else None
            if d is None:
                raise TypeError(f"{type(net).__name__} has no torchdeq DEQ attribute {deq!r}; "
                                "pass deq='<attribute name>' or solver=model_zoo.Broyden(...)")
            solver = solver_from_torchdeq(d)
        self.solver = solver
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        self.in_channels, self.image_size = int(input_shape[0]), tuple(int(s) for s in input_shape[1:])
        self.num_classes = int(num_classes)
        self.architecture = architecture or f"torchdeq:{type(net).__name__}"
        self.f_evals = FEvalTotals()
        self.cell = _CellView(self)
        self._state_shape: Optional[tuple] = None
        self.defense = make_defense(defense) if defense is not None else \
            FinalState(steps=0, first_full=False)

    # the parts ---------------------------------------------------------------------------------
    @property
    def injection_module(self):
        return getattr(self.net, self._parts[0])

    @property
    def cell_module(self):
        return getattr(self.net, self._parts[1])

    @property
    def head_module(self):
        return getattr(self.net, self._parts[2])

    def inject(self, x: Tensor) -> Tensor:
        return self.injection_module(x)

    def flatten(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], -1)

    def unflatten(self, z: Tensor) -> Tensor:
        if self._state_shape is None:
            raise RuntimeError("the state shape is known after the first model.context(x)")
        return z.reshape(z.shape[0], *self._state_shape)

    def reset_norm(self) -> None:
        """torchdeq's per-forward reset: recompute weight-normed weights, redraw dropout masks
        (what the user's forward does with ``reset_norm(self.cell)``)."""
        from torchdeq.dropout import reset_dropout
        from torchdeq.norm import reset_norm
        reset_norm(self.net)
        reset_dropout(self.net)

    # the protocol ------------------------------------------------------------------------------
    def context(self, x: Tensor, counter: Optional[FEvalCounter] = None,
                check: bool = True) -> _Context:
        if check:
            check_input(x, self.in_channels, self.image_size)
        self.reset_norm()
        counter = counter or FEvalCounter(x.shape[0], x.device, self.f_evals)
        return _Context(self, x, counter)

    def zero_state(self, x: Tensor) -> Tensor:
        if self._state_shape is None:
            with torch.no_grad():
                self._state_shape = tuple(self.inject(x[:1]).shape[1:])
        return x.new_zeros(x.shape[0], math.prod(self._state_shape))

    def run(self, x: Tensor, defense=None, per_state: bool = False):
        return (defense or self.defense).run(self, x, per_state=per_state)

    def forward(self, x: Tensor) -> Tensor:
        return self.defense.run(self, x, per_state=False).logits

    def set_defense(self, defense) -> "TorchDEQClassifier":
        self.defense = defense
        return self

    def describe(self) -> dict:
        return {"architecture": self.architecture, "in_channels": self.in_channels,
                "image_size": list(self.image_size), "num_classes": self.num_classes,
                "solver": self.solver.config(), "defense": self.defense.config(),
                "parts": dict(zip(("injection", "cell", "head"), self._parts))}

    def num_parameters(self, part: Optional[str] = None) -> int:
        mod = {"f": self.cell_module, "head": self.head_module, None: self.net}[part]
        return sum(p.numel() for p in mod.parameters())

    def __deepcopy__(self, memo):
        # torchdeq's weight norm leaves a computed (non-leaf) `weight` after a forward with
        # gradients, which torch refuses to deepcopy: recompute it without a graph first.
        import copy
        with torch.no_grad():
            self.reset_norm()
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        return new

    # checkpoints of the bare user module load too --------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, **kw):
        if state_dict and not any(k.startswith("net.") for k in state_dict):
            state_dict = {f"net.{k}": v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, **kw)
