"""The multiscale DEQ (MDEQ) image classifier of the reference code (spec section 1).

x --stem--> injection (branch 0 only) --> f_theta(z; x) solved for z* --> head h_Phi(z) --> logits.

The cell, stem, injection and head are built exactly as the reference builds them: per branch a
BasicBlock with weight-normed 3x3 convs, GroupNorm and variational dropout (one mask per forward),
multi-resolution fusion, a post-fuse weight-normed 1x1 conv with non-affine GroupNorm, and an
HRNet-style bottleneck head. Inputs are images in [0, 1] (no normalisation: the reference trains
without it), NCHW; any H, W works (branch i has resolution ceil(H / 2^(i + downsample))).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdeq.norm.weight_norm import WeightNorm

from .solvers import Solver, make_solver

__all__ = ["MDEQConfig", "MDEQClassifier", "MDEQ_CONFIGS", "InputError", "check_input"]


class InputError(ValueError):
    """An input batch the model cannot classify (wrong shape, range or values)."""


@dataclass(frozen=True)
class MDEQConfig:
    """Architecture hyper-parameters (the reference's yaml ``MODEL`` section)."""
    channels: tuple = (32, 64, 128, 256)          # NUM_CHANNELS, one per branch
    head_channels: tuple = (14, 28, 56, 112)      # HEAD_CHANNELS
    final_channels: int = 1680                    # FINAL_CHANSIZE
    num_groups: int = 8                           # NUM_GROUPS (post-fuse GN uses half)
    expansion: int = 5                            # EXPANSION_FACTOR of the BasicBlock
    dropout: float = 0.22                         # variational dropout after block conv2
    downsample_times: int = 0                     # stride-2 convs in the stem
    weight_norm: bool = True                      # WNORM
    init: str = "reference"                       # 'reference' (WN quirk) or 'intended'
    block_gn_affine: bool = True
    fuse_gn_affine: bool = True
    post_gn_affine: bool = False
    bn_momentum: float = 0.1

    def __post_init__(self):
        if len(self.channels) != len(self.head_channels) or not self.channels:
            raise ValueError("channels and head_channels need one entry per branch "
                             f"(got {self.channels} and {self.head_channels})")
        for c in self.channels:
            if c % self.num_groups or c % max(self.num_groups // 2, 1):
                raise ValueError(f"every branch's channel count must be divisible by num_groups="
                                 f"{self.num_groups}; got {self.channels}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("reference", "intended"):
            raise ValueError(f"init must be 'reference' or 'intended', got {self.init!r}")
        if self.expansion < 1 or self.downsample_times < 0:
            raise ValueError("expansion must be >= 1 and downsample_times >= 0")

    @property
    def num_branches(self) -> int:
        return len(self.channels)


MDEQ_CONFIGS = {
    # CIFAR-10 DEQ-Large of the paper (11,097,438 parameters on 3x32x32).
    "deq_large": MDEQConfig(),
    # DEQ-XL of Yang et al. (2022) (48,792,098 parameters on 3x32x32).
    "deq_xl": MDEQConfig(channels=(72, 144, 288, 576), head_channels=(20, 40, 80, 160),
                         final_channels=1800),
    # Ours, sized for PGD-10 adversarial training on a 2-core CPU: stride-2 stem, two branches
    # at 14x14 / 7x7 on 28x28 inputs; f_theta costs ~2.2M multiply-adds per sample on 1x28x28
    # (checked by tests/test_mdeq.py with torch's FlopCounterMode).
    "deq_tiny": MDEQConfig(channels=(12, 24), head_channels=(8, 16), final_channels=128,
                           num_groups=4, expansion=2, dropout=0.1, downsample_times=1),
}


def _conv3x3(cin, cout, stride=1, bias=False):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)


class VariationalDropout2d(nn.Module):
    """Channel-wise dropout whose mask (B, C, 1, 1) is drawn once per forward and reused by every
    f call of that forward (spec 1.3). Ours rather than torchdeq's because the mask must be drawn
    explicitly per forward on the input's device and sliced to the samples still being solved."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def sample_mask(self, batch: int, channels: int, device, dtype) -> Optional[Tensor]:
        if not self.training or self.p == 0:
            return None
        m = torch.empty(batch, channels, 1, 1, device=device, dtype=dtype).bernoulli_(1 - self.p)
        return m / (1 - self.p)


class BasicBlock(nn.Module):
    """Branch block of the cell: conv-GN-ReLU-conv-drop, + injection, GN, residual, ReLU, GN."""

    def __init__(self, c: int, cfg: MDEQConfig):
        super().__init__()
        e = c * cfg.expansion
        self.conv1 = _conv3x3(c, e)
        self.gn1 = nn.GroupNorm(cfg.num_groups, e, affine=cfg.block_gn_affine)
        self.conv2 = _conv3x3(e, c)
        self.gn2 = nn.GroupNorm(cfg.num_groups, c, affine=cfg.block_gn_affine)
        self.gn3 = nn.GroupNorm(cfg.num_groups, c, affine=cfg.block_gn_affine)
        self.drop = VariationalDropout2d(cfg.dropout)

    def pre(self, z: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The part that does not depend on the input x."""
        h = self.conv2(F.relu(self.gn1(self.conv1(z))))
        return h if mask is None else h * mask

    def post(self, h: Tensor, z: Tensor, inj: Optional[Tensor]) -> Tensor:
        if inj is not None:
            h = h + inj
        return self.gn3(F.relu(self.gn2(h) + z))

    def forward(self, z: Tensor, inj: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
        return self.post(self.pre(z, mask), z, inj)


class Downsample(nn.Module):
    """(i - j) stride-2 3x3 convs from branch j to branch i, GN after each, ReLU between."""

    def __init__(self, cj: int, ci: int, steps: int, cfg: MDEQConfig):
        super().__init__()
        layers = []
        for s in range(steps):
            last = s == steps - 1
            cout = ci if last else cj
            layers += [_conv3x3(cj, cout, stride=2),
                       nn.GroupNorm(cfg.num_groups, cout, affine=cfg.fuse_gn_affine)]
            if not last:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Upsample(nn.Module):
    """1x1 conv + GN from branch j to branch i, then nearest upsampling to branch i's size."""

    def __init__(self, cj: int, ci: int, cfg: MDEQConfig):
        super().__init__()
        self.conv = nn.Conv2d(cj, ci, 1, bias=False)
        self.gn = nn.GroupNorm(cfg.num_groups, ci, affine=cfg.fuse_gn_affine)

    def forward(self, x, size):
        # size= rather than scale_factor= so that odd resolutions (28 -> 14 -> 7 -> 4) line up;
        # identical to the reference's scale_factor=2^k on 32x32.
        return F.interpolate(self.gn(self.conv(x)), size=size, mode="nearest")


# with_fixed_state precomputes the fusion terms of constant branches (bitwise the same values;
# False: recompute them at every call, the pre-issue-16 behaviour, for A/B benchmarks).
CACHE_CONSTANT_FUSION = True


class MDEQCell(nn.Module):
    """f_theta(z; x): branch blocks, multi-resolution fusion, post-fuse conv + GN (spec 1.3)."""

    def __init__(self, cfg: MDEQConfig):
        super().__init__()
        ch = cfg.channels
        n = len(ch)
        self.blocks = nn.ModuleList(BasicBlock(c, cfg) for c in ch)
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(Upsample(ch[j], ch[i], cfg))
                elif j < i:
                    row.append(Downsample(ch[j], ch[i], i - j, cfg))
                else:
                    row.append(nn.Identity())
            self.fuse.append(row)
        self.post = nn.ModuleList(nn.Conv2d(c, c, 1, bias=False) for c in ch)
        self.post_gn = nn.ModuleList(
            nn.GroupNorm(max(cfg.num_groups // 2, 1), c, affine=cfg.post_gn_affine) for c in ch)

    def forward(self, z: list, inj: list, masks: Optional[list]) -> list:
        b = [blk(z[i], inj[i], None if masks is None else masks[i])
             for i, blk in enumerate(self.blocks)]
        return self._fuse(b)

    def with_fixed_state(self, z: list, masks: Optional[list]):
        """f(z; .) for a FIXED z as a function of the injection only. The x-independent work
        (every block's convs, and whole blocks without injection) is done once, so repeated
        evaluations under changing inputs (Sec. 3.2's R entropy steps) cost only the
        injection-dependent tail. Same operations, same result as ``forward``."""
        pre = [blk.pre(z[i], None if masks is None else masks[i])
               for i, blk in enumerate(self.blocks)]
        const = [None if i == 0 else blk.post(pre[i], z[i], None)
                 for i, blk in enumerate(self.blocks)]
        # The fusion terms from a constant branch j into branch i are constant too (issue 16:
        # the upsampling of branch 1 into branch 0 was redone at every entropy step).
        fused = {(i, j): self._fuse_term(i, j, const[j], pre[i].shape[-2:])
                 for i in range(len(const)) for j in range(len(const))
                 if i != j and const[j] is not None} if CACHE_CONSTANT_FUSION else None

        def g(inj: list) -> list:
            b = [blk.post(pre[i], z[i], inj[i]) if inj[i] is not None or const[i] is None
                 else const[i] for i, blk in enumerate(self.blocks)]
            return self._fuse(b, fused)
        return g

    def _fuse_term(self, i: int, j: int, bj: Tensor, size) -> Tensor:
        return self.fuse[i][j](bj, size) if j > i else self.fuse[i][j](bj)

    def _fuse(self, b: list, fused: Optional[dict] = None) -> list:
        """``fused``: precomputed fusion terms {(i, j): term} (the same values)."""
        out = []
        for i in range(len(b)):
            s = b[i]
            for j in range(len(b)):
                if j != i:
                    t = fused.get((i, j)) if fused else None
                    s = s + (t if t is not None else self._fuse_term(i, j, b[j], b[i].shape[-2:]))
            out.append(self.post_gn[i](self.post[i](F.relu(s))))
        return out


class Bottleneck(nn.Module):
    """HRNet head bottleneck c -> 4h with non-affine BN inside and an affine-BN shortcut."""
    expansion = 4
    # conv -> BN pairs inside forward (model_zoo.forward's bn_fold lever folds them)
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, cin: int, h: int, momentum: float):
        super().__init__()
        out = h * self.expansion
        self.conv1 = nn.Conv2d(cin, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h, momentum=momentum, affine=False)
        self.conv2 = _conv3x3(h, h)
        self.bn2 = nn.BatchNorm2d(h, momentum=momentum, affine=False)
        self.conv3 = nn.Conv2d(h, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, momentum=momentum, affine=False)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, out, 1, bias=False),
                                      nn.BatchNorm2d(out, momentum=momentum))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + self.shortcut(x))


class ClassificationHead(nn.Module):
    """h_Phi: multi-scale state -> logits (spec 1.5). Applied to any state z[t] (raw)."""

    def __init__(self, cfg: MDEQConfig, num_classes: int):
        super().__init__()
        ch, hc, mom = cfg.channels, cfg.head_channels, cfg.bn_momentum
        self.incre = nn.ModuleList(Bottleneck(c, h, mom) for c, h in zip(ch, hc))
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(hc[i] * 4, hc[i + 1] * 4, 3, 2, 1, bias=True),
                          nn.BatchNorm2d(hc[i + 1] * 4, momentum=mom), nn.ReLU())
            for i in range(len(ch) - 1))
        self.final = nn.Sequential(nn.Conv2d(hc[-1] * 4, cfg.final_channels, 1, bias=True),
                                   nn.BatchNorm2d(cfg.final_channels, momentum=mom), nn.ReLU())
        self.classifier = nn.Linear(cfg.final_channels, num_classes)

    def _trunk(self, z: list) -> Tensor:
        y = self.incre[0](z[0])
        for i, down in enumerate(self.down):
            y = self.incre[i + 1](z[i + 1]) + down(y)
        return y

    def forward(self, z: list) -> Tensor:
        y = self.final(self._trunk(z))
        return self.classifier(y.mean(dim=(2, 3)))

    def forward_layout_safe(self, z: list) -> Tensor:
        """``forward`` with the last ReLU and the spatial mean as :class:`_ReluMean`: bitwise
        the same logits and input gradient, without the slow mixed-layout ReLU backward that a
        channels-last head otherwise gets from the mean's (NCHW) gradient. For the Sec. 3.2
        input updates (first derivatives only)."""
        y = self._trunk(z)
        *pre, last = list(self.final)
        if not isinstance(last, nn.ReLU):
            return self.classifier(self.final(y).mean(dim=(2, 3)))
        for mod in pre:
            y = mod(y)
        return self.classifier(_ReluMean.apply(y))


class _ReluMean(torch.autograd.Function):
    """relu(a).mean((2, 3)) with the backward computed in a's memory layout. Autograd's own
    backward divides the expanded gradient into an NCHW tensor and then runs the ReLU backward
    against a channels-last output: a strided mixed-layout loop, 2.0 ms instead of 0.05 ms for
    64x128x7x7 on this CPU (torch offers no layout hint for MeanBackward, hence our own). Same
    values: g / n on the (B, C) gradient is the same division as on its expansion, and the
    ReLU backward is aten's own threshold_backward."""

    @staticmethod
    def forward(ctx, a):
        y = torch.relu(a)
        ctx.save_for_backward(y)
        return y.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        n = y.shape[2] * y.shape[3]
        gy = torch.empty_like(y)  # y's layout (empty_like preserves it)
        gy.copy_((g / n)[:, :, None, None].expand_as(y))
        return torch.ops.aten.threshold_backward(gy, y, 0)


def check_input(x, in_channels: int, image_size: Sequence[int], dtype=None) -> None:
    """Raise :class:`InputError` unless ``x`` is a finite float batch (B, C, H, W) in [0, 1].

    ``dtype``: the model's parameter dtype; images of another float dtype (float64 data for a
    float32 model, float16) are refused with the conversion to use rather than converted
    silently (a silent cast would also hide the precision the caller thinks they evaluate at).
    Values within a few ulps of [0, 1] (e.g. 1 + 1 ulp from a normalisation round trip) are
    accepted; a real violation reports the exact range found."""
    if not torch.is_tensor(x):
        raise InputError(f"expected a torch.Tensor of images, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise InputError(f"expected float images in [0, 1], got dtype {x.dtype} "
                         "(convert uint8 images with x.float() / 255)")
    if dtype is not None and x.dtype != dtype:
        raise InputError(f"expected images of dtype {dtype} (the model's), got {x.dtype}; "
                         f"convert with x.to({dtype})")
    if x.dim() != 4:
        raise InputError(f"expected a batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise InputError(f"expected {in_channels} channel(s), got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    if tuple(x.shape[2:]) != tuple(image_size):
        raise InputError(f"expected images of size {tuple(image_size)}, got {tuple(x.shape[2:])}")
    if x.shape[0] == 0:
        raise InputError("empty batch")
    if not torch.isfinite(x).all():
        raise InputError("input contains NaN or infinite values")
    lo, hi = float(x.detach().min()), float(x.detach().max())
    tol = 4 * torch.finfo(x.dtype).eps
    if lo < -tol or hi > 1 + tol:
        # repr, not a rounded format: '.4g' printed 1.0001 as "1" and the message read "[0, 1]"
        raise InputError(f"inputs must lie in [0, 1] (normalisation lives inside the model); "
                         f"got values in [{lo!r}, {hi!r}]")


def _param_dtype(module):
    p = next(module.parameters(), None)
    return None if p is None else p.dtype


class FEvalTotals:
    """Cumulative f_theta evaluations of a model over its lifetime, counted in samples (one f
    call on a batch of b samples adds b). Attacks read differences of it to report their cost."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.nograd, self.grad = 0, 0

    @property
    def total(self) -> int:
        return self.nograd + self.grad

    def snapshot(self) -> dict:
        return {"nograd": self.nograd, "grad": self.grad}

    def __repr__(self):
        return f"FEvalTotals(nograd={self.nograd}, grad={self.grad})"


class FEvalCounter:
    """Per-sample f_theta evaluation counts of one forward: with and without autograd graph
    (also added to the model's lifetime ``totals`` when given)."""

    def __init__(self, batch: int, device, totals: Optional[FEvalTotals] = None):
        self.batch, self.totals = batch, totals
        self.nograd = torch.zeros(batch, dtype=torch.long, device=device)
        self.grad = torch.zeros(batch, dtype=torch.long, device=device)

    def add(self, idx: Optional[Tensor], with_grad: bool):
        tgt = self.grad if with_grad else self.nograd
        if idx is None:
            tgt.add_(1)
        else:
            tgt.index_add_(0, idx, torch.ones_like(idx))
        if self.totals is not None:
            n = self.batch if idx is None else int(idx.numel())
            if with_grad:
                self.totals.grad += n
            else:
                self.totals.nograd += n

    @property
    def total(self) -> Tensor:
        return self.nograd + self.grad


class CellContext:
    """Everything f_theta(.; x) needs for one batch: the injection (computed once per input),
    the dropout masks (drawn once per forward) and the f-eval counter. ``ctx.f(z_flat, idx)`` is
    the flat map (b, D) -> (b, D) the solvers iterate."""

    def __init__(self, model: "MDEQClassifier", x: Tensor, masks, counter: FEvalCounter):
        self.model, self.masks, self.counter = model, masks, counter
        self.set_input(x)

    def set_input(self, x: Tensor) -> None:
        """(Re)compute the injection for input x (the Sec. 3.2 defense changes the input)."""
        self.x = x
        self.inj = self.model.inject(x)

    def _slice(self, idx):
        if idx is None:
            return self.inj, self.masks
        inj = [None if t is None else t.index_select(0, idx) for t in self.inj]
        masks = None if self.masks is None else [
            None if m is None else m.index_select(0, idx) for m in self.masks]
        return inj, masks

    def f(self, z: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        inj, masks = self._slice(idx)
        self.counter.add(idx, torch.is_grad_enabled() and (z.requires_grad or any(
            t is not None and t.requires_grad for t in inj)))
        m = self.model
        return m.flatten(m.cell(m.unflatten(z), inj, masks))

    def head(self, z: Tensor) -> Tensor:
        return self.model.head(self.model.unflatten(z))


class MDEQClassifier(nn.Module):
    """A DEQ image classifier with an observable, configurable forward pass.

    Args:
        config: architecture (:data:`MDEQ_CONFIGS`).
        in_channels, image_size: input geometry, e.g. 1, (28, 28) or 3, (32, 32).
        num_classes: number of logits.
        solver: the fixed-point solver (default Broyden, N=8, eps=1e-3, per-sample decisions).
        defense: the forward pass (``model_zoo.forward``); default ``FinalState()`` (reference
            evaluation: f then 9 damped steps at lambda=0.5 after the solve).

    ``model(x)`` returns logits (B, num_classes) of the configured defense; ``model.run(x, ...)``
    returns the full :class:`~model_zoo.forward.ForwardRecord` (states, per-state logits,
    entropies, residuals, f-eval counts).
    """
    is_deq = True

    def __init__(self, config: MDEQConfig = MDEQ_CONFIGS["deq_large"], in_channels: int = 3,
                 image_size: Sequence[int] = (32, 32), num_classes: int = 10,
                 solver: Optional[Solver] = None, defense=None):
        super().__init__()
        self.config = config
        self.in_channels = int(in_channels)
        self.image_size = tuple(int(s) for s in image_size)
        self.num_classes = int(num_classes)
        c0, mom = config.channels[0], config.bn_momentum
        stem = []
        cin = in_channels
        for k in range(2):
            stride = 2 if k < config.downsample_times else 1
            stem += [_conv3x3(cin, c0, stride), nn.BatchNorm2d(c0, momentum=mom), nn.ReLU()]
            cin = c0
        for _ in range(max(config.downsample_times - 2, 0)):
            stem += [_conv3x3(c0, c0, 2), nn.BatchNorm2d(c0, momentum=mom), nn.ReLU()]
        self.stem = nn.Sequential(*stem)
        has_stage0 = not (config.downsample_times == 0 and config.num_branches <= 2)
        self.stage0 = (nn.Sequential(nn.Conv2d(c0, c0, 1, bias=False),
                                     nn.BatchNorm2d(c0, momentum=mom), nn.ReLU())
                       if has_stage0 else None)
        self.cell = MDEQCell(config)
        self.head = ClassificationHead(config, num_classes)
        self._wn = []
        self._init_weights()
        if config.weight_norm:
            for mod in self._wn_modules():
                self._wn.append((mod, WeightNorm.apply(mod, {}, names="weight", dims=0)))
        # Branch geometry, from the stem's conv arithmetic.
        h, w = self.image_size
        for _ in range(config.downsample_times):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.branch_shapes = []
        for c in config.channels:
            self.branch_shapes.append((c, h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        self.state_dim = sum(c * h * w for c, h, w in self.branch_shapes)
        self.solver = solver if solver is not None else make_solver("broyden")
        self.f_evals = FEvalTotals()  # lifetime count of f_theta evaluations (samples)
        if defense is None:
            from .forward import FinalState
            defense = FinalState()
        self.defense = defense

    # -- construction helpers -------------------------------------------------------------------
    def _wn_modules(self):
        for blk in self.cell.blocks:
            yield blk.conv1
            yield blk.conv2
        yield from self.cell.post

    def _init_weights(self):
        """Spec 1.6: convs (and their biases) ~ N(0, 0.01), BN weight 1 / bias 0. In the
        reference, weight-normed convs were already split into (g, v) when this ran, so they
        keep PyTorch's default (kaiming-uniform) v with g = ||v|| ('reference' preset). The
        'intended' preset applies N(0, 0.01) to them as well."""
        wn = set(id(m) for m in self._wn_modules()) if self.config.weight_norm else set()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if id(m) in wn and self.config.init == "reference":
                    continue
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.normal_(m.bias, 0, 0.01)
            elif isinstance(m, nn.BatchNorm2d) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- pieces ----------------------------------------------------------------------------------
    def flatten(self, z: list) -> Tensor:
        return torch.cat([t.reshape(t.shape[0], -1) for t in z], 1)

    def unflatten(self, z: Tensor) -> list:
        out, k = [], 0
        for c, h, w in self.branch_shapes:
            n = c * h * w
            out.append(z[:, k:k + n].reshape(z.shape[0], c, h, w))
            k += n
        return out

    def inject(self, x: Tensor) -> list:
        """Input injection, one entry per branch; only branch 0 receives x (spec 1.2)."""
        s = self.stem(x)
        if self.stage0 is not None:
            s = self.stage0(s)
        return [s] + [None] * (self.config.num_branches - 1)

    def reset_weight_norm(self) -> None:
        """Recompute the weight-normed weights once per forward (the reference's ``_reset``)."""
        for mod, fn in self._wn:
            fn(mod)

    def context(self, x: Tensor, counter: Optional[FEvalCounter] = None,
                check: bool = True) -> CellContext:
        """Validate x, refresh weight norm, draw dropout masks, compute the injection."""
        if check:
            check_input(x, self.in_channels, self.image_size, _param_dtype(self))
        self.reset_weight_norm()
        counter = counter or FEvalCounter(x.shape[0], x.device, self.f_evals)
        masks = [blk.drop.sample_mask(x.shape[0], c, x.device, x.dtype)
                 for blk, (c, _, _) in zip(self.cell.blocks, self.branch_shapes)]
        if all(m is None for m in masks):
            masks = None
        return CellContext(self, x, masks, counter)

    def zero_state(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.state_dim)

    # -- forward ---------------------------------------------------------------------------------
    def run(self, x: Tensor, defense=None, per_state: bool = False):
        """Full record of one forward with ``defense`` (default: the model's)."""
        return (defense or self.defense).run(self, x, per_state=per_state)

    def forward(self, x: Tensor) -> Tensor:
        return self.defense.run(self, x, per_state=False).logits

    def set_defense(self, defense) -> "MDEQClassifier":
        self.defense = defense
        return self

    def describe(self) -> dict:
        return {"architecture": "mdeq", "config": asdict(self.config),
                "in_channels": self.in_channels, "image_size": list(self.image_size),
                "num_classes": self.num_classes, "solver": self.solver.config(),
                "defense": self.defense.config()}

    def num_parameters(self, part: Optional[str] = None) -> int:
        mod = {"f": self.cell, "head": self.head, None: self}[part]
        return sum(p.numel() for p in mod.parameters())
