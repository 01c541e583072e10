"""The DEQ protocol: the minimal interface a model must provide for deqbench's DEQ-aware features.

deqbench treats any ``nn.Module`` that maps [0, 1] images (B, C, H, W) to logits (B, K) as a
classifier (clean accuracy, PGD, AutoAttack, transfer, leaderboards).  A model that additionally
satisfies this protocol is *DEQ-aware*: the harness solves its fixed point itself, so it can read
every state z[1..N] and run the DEQ-specific protocol of the paper (Yang et al., ICML 2023):

==========================  ===================================================================
feature                     what it uses
==========================  ===================================================================
``core``                    ``is_deq`` (True), ``solver`` (:class:`model_zoo.solvers.Solver`:
                            ``max_iter`` = N, ``solve``, ``with_options``, ``keep_graph``,
                            ``decisions``, ``stop_mode``, ``eps``), ``context(x, counter=None,
                            check=True)`` -> :class:`DEQContext`, ``zero_state(x)`` -> z[0]
                            (B, D), ``defense`` / ``set_defense(d)`` / ``run(x, defense=None,
                            per_state=False)`` -> :class:`~model_zoo.forward.ForwardRecord`.
                            Enough for the final state (phantom / implicit gradients), the early
                            state z[i] and its selection, the (i, Ka, lambda) grid of Eq. (11),
                            PGD / AutoAttack / torchattacks with DEQ surrogates, the obfuscation
                            checks and per-state entropies H(z[t]) (Eq. 6).
``entropy_reduction``       ``core`` + a Broyden solver (:class:`model_zoo.solvers.Broyden`, the
                            Sec. 3.2 code resumes its secant memory) + ``inject(x)`` (the input
                            injection), ``flatten`` / ``unflatten`` (state <-> (B, D)),
                            ``cell.with_fixed_state(unflatten(z), ctx.masks)`` -> a function of
                            the injection only (Eq. 8 differentiates H(h(f(z; x'))) w.r.t. x'
                            with z fixed), ``ctx.masks`` (dropout masks or None).
==========================  ===================================================================

:class:`DEQContext` is one batch's view of f_theta(.; x): ``ctx.f(z, idx=None)`` maps flat states
(b, D) -> (b, D) for the samples ``idx`` (None = all; per-sample stopping slices the injection),
``ctx.head(z)`` maps (b, D) -> logits (b, K), ``ctx.set_input(x)`` recomputes the injection (the
Sec. 3.2 defense changes x), ``ctx.x`` is the current input and ``ctx.counter`` counts f
evaluations per sample (``add(idx, with_grad)``, ``nograd`` / ``grad`` (B,) tensors).

:func:`check_deq_protocol` names what a model lacks; :func:`is_deq_aware` is what the harness
uses to decide (``benchmark()``, ``model_zoo.create``): a model that says ``is_deq = True`` but
lacks part of ``core`` is an error, never silently evaluated as a plain classifier.

Two ready-made implementations: :class:`model_zoo.mdeq.MDEQClassifier` (the paper's MDEQ) and
:class:`model_zoo.torchdeq_adapter.TorchDEQClassifier` (any DEQ written with torchdeq).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["DEQContext", "DEQModel", "FEVALCounterLike", "ProtocolReport", "ProtocolError",
           "FEATURES", "check_deq_protocol", "is_deq_aware", "require_deq_protocol"]


@runtime_checkable
class FEVALCounterLike(Protocol):
    """Per-sample f_theta evaluation counts of one forward (:class:`model_zoo.mdeq.FEvalCounter`)."""
    nograd: Tensor   # (B,) long
    grad: Tensor     # (B,) long

    def add(self, idx: Optional[Tensor], with_grad: bool) -> None: ...


@runtime_checkable
class DEQContext(Protocol):
    """f_theta(.; x) and the head for one batch x (B, C, H, W); states are flat (b, D)."""
    x: Tensor
    counter: FEVALCounterLike

    def f(self, z: Tensor, idx: Optional[Tensor] = None) -> Tensor: ...

    def head(self, z: Tensor) -> Tensor: ...

    def set_input(self, x: Tensor) -> None: ...


@runtime_checkable
class DEQModel(Protocol):
    """What the DEQ-aware protocol calls on a model (feature ``core``)."""
    is_deq: bool
    solver: Any      # model_zoo.solvers.Solver
    defense: Any     # model_zoo.forward._Forward

    def context(self, x: Tensor, counter: Any = None, check: bool = True) -> DEQContext: ...

    def zero_state(self, x: Tensor) -> Tensor: ...

    def run(self, x: Tensor, defense: Any = None, per_state: bool = False) -> Any: ...

    def set_defense(self, defense: Any) -> Any: ...

    def __call__(self, x: Tensor) -> Tensor: ...


#: feature -> (model attributes, solver attributes, context attributes) it needs.
FEATURES = {
    "core": (("is_deq", "solver", "defense", "context", "zero_state", "run", "set_defense"),
             ("max_iter", "solve", "with_options", "keep_graph", "decisions", "stop_mode", "eps"),
             ("f", "head", "set_input", "x", "counter")),
    "entropy_reduction": (("inject", "flatten", "unflatten", "cell"), (), ("masks",)),
}
_CALLABLE = {"context", "zero_state", "run", "set_defense", "inject", "flatten", "unflatten",
             "solve", "with_options", "f", "head", "set_input"}


class ProtocolError(TypeError):
    """A model that claims to be a DEQ (``is_deq = True``) but lacks part of the protocol."""


@dataclass
class ProtocolReport:
    """Result of :func:`check_deq_protocol`: ``missing[feature]`` lists what is absent, as
    ``'model.solve'``-style names (empty list: the feature is supported)."""
    model: str
    missing: dict = field(default_factory=dict)
    probed: bool = False

    @property
    def ok(self) -> bool:
        return not self.missing.get("core")

    def supports(self, feature: str) -> bool:
        return self.ok and not self.missing.get(feature)

    @property
    def features(self) -> list:
        return [k for k in FEATURES if self.supports(k)]

    def message(self) -> str:
        parts = [f"{feat}: {', '.join(names)}" for feat, names in self.missing.items() if names]
        if not parts:
            return f"{self.model} satisfies the DEQ protocol ({', '.join(self.features)})"
        return (f"{self.model} lacks part of the DEQ protocol (model_zoo/protocol.py) -- "
                + "; ".join(parts))


def _has(obj, name: str) -> bool:
    try:
        v = getattr(obj, name)
    except Exception:  # a property that fails counts as missing
        return False
    return callable(v) if name in _CALLABLE else True


def check_deq_protocol(model, x: Optional[Tensor] = None) -> ProtocolReport:
    """Which DEQ features ``model`` supports, naming what it lacks.

    Static check of the attributes of :data:`FEATURES`; with an example batch ``x`` (B, C, H, W)
    it also builds a context and checks the shapes: ``zero_state(x)`` (B, D), ``ctx.f`` (B, D) ->
    (B, D), ``ctx.head`` (B, D) -> (B, K) (the context attributes are only checked then).
    """
    import torch

    from .solvers import Broyden

    name = type(model).__name__
    rep = ProtocolReport(model=name)
    ctx = None
    if x is not None and all(_has(model, a) for a in ("context", "zero_state")):
        rep.probed = True
        try:
            with torch.no_grad():
                ctx = model.context(x)
        except Exception as e:
            rep.missing.setdefault("core", []).append(
                f"model.context(x) failed: {type(e).__name__}: {e}")
    for feat, (m_attrs, s_attrs, c_attrs) in FEATURES.items():
        miss = [f"model.{a}" for a in m_attrs if not _has(model, a)]
        if feat == "core" and _has(model, "is_deq") and not getattr(model, "is_deq"):
            miss.append("model.is_deq is False")
        solver = getattr(model, "solver", None)
        if solver is not None:
            miss += [f"model.solver.{a}" for a in s_attrs if not _has(solver, a)]
        if feat == "entropy_reduction":
            if solver is not None and not isinstance(solver, Broyden):
                miss.append(f"a Broyden solver (model.solver is {type(solver).__name__})")
            cell = getattr(model, "cell", None)
            if cell is not None and not callable(getattr(cell, "with_fixed_state", None)):
                miss.append("model.cell.with_fixed_state")
        if ctx is not None:
            miss += [f"ctx.{a}" for a in c_attrs if not _has(ctx, a)]
        rep.missing.setdefault(feat, [])
        rep.missing[feat] += miss
    if ctx is not None and rep.ok:
        _probe_shapes(model, ctx, x, rep)
    return rep


def _probe_shapes(model, ctx, x, rep: ProtocolReport) -> None:
    import torch
    B = x.shape[0]
    miss = rep.missing["core"]
    try:
        with torch.no_grad():
            z0 = model.zero_state(x)
            if z0.dim() != 2 or z0.shape[0] != B:
                miss.append(f"model.zero_state(x) must be (B, D) = ({B}, D), got {tuple(z0.shape)}")
                return
            fz = ctx.f(z0)
            if tuple(fz.shape) != tuple(z0.shape):
                miss.append(f"ctx.f must map (B, D) -> (B, D), got {tuple(z0.shape)} -> "
                            f"{tuple(fz.shape)}")
                return
            idx = torch.arange(min(B, 1), device=z0.device)
            if tuple(ctx.f(z0[idx], idx).shape) != (len(idx), z0.shape[1]):
                miss.append("ctx.f(z[idx], idx) must evaluate only the samples idx")
            out = ctx.head(fz)
            if out.dim() != 2 or out.shape[0] != B:
                miss.append(f"ctx.head must map (B, D) -> (B, K), got {tuple(out.shape)}")
    except Exception as e:
        miss.append(f"probing ctx.f / ctx.head failed: {type(e).__name__}: {e}")


def is_deq_aware(model, x: Optional[Tensor] = None) -> bool:
    """True when the harness runs the DEQ protocol on ``model``: it says ``is_deq = True`` and
    satisfies ``core``.  Raises :class:`ProtocolError` (naming the missing pieces) when it says
    ``is_deq = True`` but does not; False for a plain classifier."""
    if not getattr(model, "is_deq", False):
        return False
    require_deq_protocol(model, x)
    return True


def require_deq_protocol(model, x: Optional[Tensor] = None,
                         feature: str = "core") -> ProtocolReport:
    """:func:`check_deq_protocol`, raising :class:`ProtocolError` unless ``feature`` is supported."""
    rep = check_deq_protocol(model, x)
    if not rep.supports(feature):
        raise ProtocolError(rep.message())
    return rep
