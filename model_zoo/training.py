"""Training recipes of the paper (Sec. 3.3, Sec. 4, App. A) and a resumable trainer.

Recipes (spec section 3): clean pretraining of the explicit weight-tied network z = f^L(0);
DEQ training with the phantom gradient (f + K damped steps) or the implicit gradient; Jacobian
regularisation (Hutchinson); PGD-AT (Madry) and TRADES with the attack run in eval mode through
the training forward; Sec. 3.3 random intermediate states (presets ``reference`` / ``paper``);
Adam with a cosine schedule stepped per iteration.

The trainer takes its data as a loader factory (``loader_for_epoch(epoch) -> iterable of (x, y)``
global batches, the same order on every process) and validation tensors; it never reads files
itself. Determinism: every optimizer step (and every shard of it) reseeds torch's generator from
(seed, step, shard), so a resumed run ends with the same weights as an uninterrupted one, and
single-process training with ``shards = W`` equals DDP with W processes.
"""
from __future__ import annotations

import csv
import math
import os
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchdeq.loss import jac_reg
from tqdm import tqdm

from .forward import FinalState, RandomIntermediate
from .registry import save_checkpoint
from .scoring import score_logits
from .train_config import TrainConfig

__all__ = ["Trainer", "TrainingInterrupted", "weight_tied_logits", "pgd_attack", "trades_attack",
           "jacobian_penalty", "training_defense", "RandomIntermediateLoss"]

# Sec. 3.3 under the name STYLE.md asks for: the loss from random intermediate states.
RandomIntermediateLoss = RandomIntermediate


class TrainingInterrupted(RuntimeError):
    """Raised after a SIGINT/SIGTERM once the resumable checkpoint has been written."""


def training_defense(cfg: TrainConfig):
    t = cfg.train
    if t.random_states:
        return RandomIntermediate(t.random_states, t.unroll_steps, t.unroll_lam)
    return FinalState(steps=t.unroll_steps, lam=t.unroll_lam, gradient=t.gradient,
                      backward_iter=t.backward_iter)


def weight_tied_logits(model, x: Tensor, layers: int) -> Tensor:
    """Pretraining forward: the explicit weight-tied net z[m+1] = f(z[m]; x), z[0] = 0 (Eq. 2),
    ``layers`` times with full backpropagation, head on z[L]."""
    ctx = model.context(x)
    z = model.zero_state(x)
    for _ in range(layers):
        z = ctx.f(z)
    return ctx.head(z)


def pgd_attack(logits_fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float,
               alpha: float, steps: int) -> Tensor:
    """Training PGD (spec 3.4): x0 = clip01(x + U(-eps, eps)), ``steps`` sign steps on the CE
    of ``logits_fn`` (the training forward in eval mode), projected to the ball and [0, 1]."""
    x = x.detach()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        xv = x_adv.requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(F.cross_entropy(logits_fn(xv), y, reduction="sum"), xv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def trades_attack(logits_fn, x: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """TRADES inner maximisation (spec 3.5): x_adv = clip01(x + 0.001 N(0, 1)), then sign steps on
    KL(p(x) || p(x_adv)). p(x) is computed once per batch (the reference recomputes it every
    step; with a deterministic forward that only wastes time)."""
    x = x.detach()
    with torch.no_grad():
        p_nat = F.softmax(logits_fn(x), -1)
    # The reference does not clamp this start; our models refuse inputs outside [0, 1].
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(steps):
        xv = x_adv.requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(logits_fn(xv), -1), p_nat, reduction="sum")
            (g,) = torch.autograd.grad(kl, xv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach().clamp(0, 1)


def jacobian_penalty(model, x: Tensor, max_iter: int, vecs: int = 2) -> Tensor:
    """Hutchinson estimate of ||J_f(z*)||_F^2 / numel(z) at the solver output (spec 3.3), with
    torchdeq's ``jac_reg``; differentiable w.r.t. the parameters (create_graph)."""
    ctx = model.context(x, check=False)
    traj = model.solver.with_options(max_iter=max_iter).solve(ctx.f, model.zero_state(x))
    z0 = traj.best.detach().requires_grad_(True)
    f0 = ctx.f(z0)
    return jac_reg(f0, z0, vecs=vecs, create_graph=True)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _BatchNormSync:
    """BatchNorm running statistics of one optimizer step split into micro-batches (shards of
    this process and of every DDP rank): every shard starts from the step's initial statistics
    (so the eval-mode attack of each shard reads the same ones), and the step ends with their
    mean over ALL shards (all-reduced across ranks). So single-process training with
    ``shards = W`` and DDP with W processes (``broadcast_buffers=False``) update them alike,
    where DDP's default (rank 0's buffers broadcast at each forward) would not."""

    def __init__(self, model):
        self.mods = [m for m in model.modules()
                     if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                     and m.track_running_stats and m.running_mean is not None]
        self.start = [(m.running_mean.clone(), m.running_var.clone(),
                       m.num_batches_tracked.clone()) for m in self.mods]
        self.acc = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b, _ in self.start]
        self.nbt = [n.clone() for _, _, n in self.start]

    def begin_shard(self):
        with torch.no_grad():
            for m, (mu, var, nbt) in zip(self.mods, self.start):
                m.running_mean.copy_(mu)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(nbt)

    def end_shard(self):
        with torch.no_grad():
            for k, (m, (am, av)) in enumerate(zip(self.mods, self.acc)):
                am.add_(m.running_mean)
                av.add_(m.running_var)
                self.nbt[k] = m.num_batches_tracked.clone()

    def finish(self, n_total: int, distributed: bool):
        with torch.no_grad():
            for m, (am, av), nbt in zip(self.mods, self.acc, self.nbt):
                if distributed:
                    torch.distributed.all_reduce(am)
                    torch.distributed.all_reduce(av)
                m.running_mean.copy_(am / n_total)
                m.running_var.copy_(av / n_total)
                m.num_batches_tracked.copy_(nbt)


class Trainer:
    """Train ``model`` (an MDEQClassifier, or any zoo classifier for ``standard``/``pgd_at``
    without DEQ-only options) under ``cfg``.

    Args:
        loader_for_epoch: epoch -> iterable of global (x, y) batches (deterministic per epoch).
        val_x, val_y: held-out validation data (never the test set) for checkpoint selection.
        out_dir: where ``last.pt`` (resumable), ``best.pt`` (selected weights), ``log.csv`` go.
        rank, world, ddp_model: set by the distributed launcher; ``ddp_model`` wraps ``model``.
        shards: micro-batches per process (gradient accumulation).
        checkpoint_every_s: also write the resumable ``last.pt`` inside an epoch when this many
            seconds passed since the last write (so a SIGKILL loses at most that much work);
            ``None`` or 0: only at epoch ends and on SIGINT/SIGTERM.
    """

    def __init__(self, cfg: TrainConfig, model, loader_for_epoch, val_x: Tensor, val_y: Tensor,
                 out_dir, device="cpu", rank: int = 0, world: int = 1, ddp_model=None,
                 shards: int = 1, progress: bool = True,
                 checkpoint_every_s: Optional[float] = 600.0):
        self.cfg, self.model, self.loader_for_epoch = cfg, model, loader_for_epoch
        self.val_x, self.val_y = val_x[:cfg.data.val_n], val_y[:cfg.data.val_n]
        self.out = Path(out_dir)
        self.device = torch.device(device)
        self.rank, self.world, self.shards = rank, world, shards
        self.train_module = ddp_model if ddp_model is not None else model
        self.is_deq = getattr(model, "is_deq", False)
        t = cfg.train
        if not self.is_deq and (t.pretrain_steps or t.random_states or t.jacobian.weight
                                or t.gradient != "phantom"):
            raise ValueError("pretraining, Sec. 3.3, Jacobian regularisation and implicit gradients "
                             "need a DEQ model")
        self.defense = training_defense(cfg) if self.is_deq else None
        if self.is_deq:  # the forward DDP and the training loss go through
            model.set_defense(self.defense)
        self.opt = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.steps_per_epoch = len(loader_for_epoch(0))
        self.total_steps = t.epochs * self.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=max(self.total_steps, 1), eta_min=t.lr_min)
        self.progress = progress and rank == 0
        self.checkpoint_every_s = checkpoint_every_s
        self._stop = False

    # -- one optimizer step -----------------------------------------------------------------------
    def _logits(self, x):  # training forward (through DDP when distributed)
        return self.train_module(x)

    def _attack_logits(self, x):  # the same forward on the bare module, eval mode
        if self.is_deq:
            return self.model.run(x, defense=self.defense).logits
        return self.model(x)

    def _shard_loss(self, x, y, pretrain: bool, jac_thres: Optional[int]) -> tuple:
        t, a = self.cfg.train, self.cfg.train.attack
        if pretrain:
            self.model.train()
            logits = weight_tied_logits(self.model, x, t.pretrain_layers)
            loss = F.cross_entropy(logits, y)
        elif t.method == "standard":
            self.model.train()
            logits = self._logits(x)
            loss = F.cross_entropy(logits, y)
        elif t.method == "pgd_at":
            self.model.eval()
            x_adv = pgd_attack(self._attack_logits, x, y, a.eps, a.alpha, a.steps)
            self.model.train()
            logits = self._logits(x_adv)
            loss = F.cross_entropy(logits, y)
        else:  # trades
            self.model.eval()
            x_adv = trades_attack(self._attack_logits, x, a.eps, a.alpha, a.steps)
            self.model.train()
            o_nat, o_adv = self._logits(x), self._logits(x_adv)
            logits = o_nat
            loss = F.cross_entropy(o_nat, y) + t.trades_beta * F.kl_div(
                F.log_softmax(o_adv, -1), F.softmax(o_nat, -1), reduction="sum") / len(x)
        if jac_thres is not None:
            loss = loss + t.jacobian.weight * jacobian_penalty(self.model, x, jac_thres,
                                                               t.jacobian.vecs)
        correct = int(score_logits(logits, y)[0].sum())  # non-finite logits: wrong
        return loss, correct

    def train_step(self, x: Tensor, y: Tensor, epoch: int, step: int) -> dict:
        cfg, t = self.cfg, self.cfg.train
        pretrain = self.is_deq and step < t.pretrain_steps
        step_rng = random.Random(cfg.seed * 1_000_003 + step)
        jac_thres = None
        j = t.jacobian
        if (self.is_deq and not pretrain and j.weight > 0
                and (j.stop_epoch is None or epoch < j.stop_epoch) and step_rng.random() < j.freq):
            jac_thres = max(1, self.model.solver.max_iter
                            + step_rng.randint(-j.rand_thres_delta, j.rand_thres_delta))
        n_total = self.world * self.shards
        xs, ys = x.tensor_split(n_total), y.tensor_split(n_total)
        self.opt.zero_grad(set_to_none=True)
        loss_sum, correct = 0.0, 0
        bn = _BatchNormSync(self.model) if n_total > 1 else None
        for k in range(self.shards):
            shard = self.rank * self.shards + k
            xk, yk = xs[shard].to(self.device), ys[shard].to(self.device)
            if bn is not None:
                bn.begin_shard()
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1024 + shard)
            loss, c = self._shard_loss(xk, yk, pretrain, jac_thres)
            (loss * len(xk) * n_total / len(x) / self.shards).backward()
            if bn is not None:
                bn.end_shard()
            loss_sum += float(loss.detach()) * len(xk)
            correct += c
        if bn is not None:
            bn.finish(n_total, distributed=self.world > 1)
        self.opt.step()
        self.sched.step()
        return {"loss": loss_sum, "correct": correct, "pretrain": int(pretrain), "n": sum(len(xs[self.rank * self.shards + k])
                                                                for k in range(self.shards))}

    # -- validation --------------------------------------------------------------------------------
    def validate(self, batch_size: int = 200) -> dict:
        """Clean and PGD-10 accuracy at the final state with the deterministic evaluation
        forward (FinalState(): f + 9 damped steps) on the held-out validation images."""
        a = self.cfg.train.attack
        was = self.model.training
        self.model.eval()
        fwd = FinalState()
        run = (lambda v: self.model.run(v, defense=fwd).logits) if self.is_deq else self.model
        gen_state = torch.get_rng_state()
        torch.manual_seed(self.cfg.seed + 7)
        clean = adv = 0
        for s in range(0, len(self.val_x), batch_size):
            xb = self.val_x[s:s + batch_size].to(self.device)
            yb = self.val_y[s:s + batch_size].to(self.device)
            with torch.no_grad():
                clean += int(score_logits(run(xb), yb)[0].sum())
            x_adv = pgd_attack(run, xb, yb, a.eps, a.alpha, 10)
            with torch.no_grad():
                adv += int(score_logits(run(x_adv), yb)[0].sum())
        torch.set_rng_state(gen_state)
        self.model.train(was)
        n = len(self.val_x)
        return {"val_clean": clean / n, "val_pgd10": adv / n}

    # -- state -------------------------------------------------------------------------------------
    def _state(self, epoch, step_in_epoch, global_step, best, history, wall):
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": global_step, "best": best,
                "history": history, "rng": torch.get_rng_state(), "config": self.cfg.to_dict(),
                "wall_s": wall, "f_evals": (self.model.f_evals.snapshot() if self.is_deq else {})}

    def _write_log(self, history):
        if not history:
            return
        path = self.out / "log.csv"
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)
        os.replace(tmp, path)

    @contextmanager
    def _signals(self):
        def handler(signum, frame):
            self._stop = True
        old = {}
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no handlers
            pass
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def request_stop(self):
        """Ask the trainer to save a resumable checkpoint after the current step and stop."""
        self._stop = True

    # -- the loop ----------------------------------------------------------------------------------
    def _f_total(self) -> float:
        """f_theta evaluations so far (with and without graph; 0 for non-DEQs)."""
        if not self.is_deq:
            return 0.0
        f = self.model.f_evals.snapshot()
        return float(f["nograd"] + f["grad"])

    def fit(self, resume: bool = False, stop_after: Optional[int] = None) -> dict:
        """Train; returns a summary. ``resume`` continues from ``out_dir/last.pt``.
        ``stop_after``: simulate an interruption after that many optimizer steps (tests)."""
        cfg, t = self.cfg, self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        epoch0, skip, step, best, history, wall0 = 0, 0, 0, None, [], 0.0
        resume_stats = None
        last = self.out / "last.pt"
        if resume:
            if not last.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint {last}")
            st = torch.load(last, map_location=self.device, weights_only=True)
            if st["config"] != cfg.to_dict():
                raise ValueError(f"--resume: {last} was written with a different config")
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            torch.set_rng_state(st["rng"])
            epoch0, skip, step = st["epoch"], st["step_in_epoch"], st["global_step"]
            best, history, wall0 = st["best"], list(st["history"]), st["wall_s"]
            resume_stats = st.get("epoch_stats")
            if self.is_deq and st["f_evals"]:
                self.model.f_evals.nograd = st["f_evals"]["nograd"]
                self.model.f_evals.grad = st["f_evals"]["grad"]
        max_steps = t.max_steps if t.max_steps is not None else self.total_steps
        t_start = time.perf_counter()
        done_steps = 0
        last_save = time.perf_counter()
        with self._signals():
            for epoch in range(epoch0, t.epochs):
                if step >= max_steps:
                    break
                t_ep = time.perf_counter()
                f0 = self._f_total()
                ep_before = 0.0  # seconds of this epoch spent before an interruption
                loss_sum = correct = seen = pre_steps = 0
                if skip and resume_stats is not None:  # the interrupted epoch's running stats
                    loss_sum, correct, seen, pre_steps = resume_stats[:4]
                    if len(resume_stats) >= 6:   # f-evals at the epoch's start, time so far
                        f0, ep_before = resume_stats[4], resume_stats[5]
                bar = tqdm(total=self.steps_per_epoch, initial=skip, disable=not self.progress,
                           desc=f"{cfg.name} epoch {epoch + 1}/{t.epochs}", leave=False)
                for b, (x, y) in enumerate(self.loader_for_epoch(epoch)):
                    if b < skip:
                        continue
                    if step >= max_steps:
                        break
                    r = self.train_step(x, y, epoch, step)
                    step += 1
                    done_steps += 1
                    loss_sum, correct, seen = loss_sum + r["loss"], correct + r["correct"], seen + r["n"]
                    pre_steps += r["pretrain"]
                    bar.update(1)
                    bar.set_postfix(loss=f"{r['loss'] / max(r['n'], 1):.3f}")
                    stopping = self._stop or (stop_after is not None and done_steps >= stop_after)
                    periodic = (self.checkpoint_every_s and b + 1 < self.steps_per_epoch
                                and time.perf_counter() - last_save >= self.checkpoint_every_s)
                    if (stopping or periodic) and self.rank == 0:
                        wall = wall0 + time.perf_counter() - t_start
                        st = self._state(epoch, b + 1, step, best, history, wall)
                        st["epoch_stats"] = [loss_sum, correct, seen, pre_steps, f0,
                                             ep_before + time.perf_counter() - t_ep]
                        _atomic_save(st, last)
                        last_save = time.perf_counter()
                    if stopping:
                        bar.close()
                        raise TrainingInterrupted(
                            f"interrupted at epoch {epoch + 1}, step {step}; saved {last}; "
                            "continue with --resume")
                bar.close()
                skip = 0
                row = {"epoch": epoch + 1, "step": step, "lr": self.sched.get_last_lr()[0],
                       "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                       "pretraining_steps": pre_steps}
                # f-evals of the training steps only (the validation attack below is not
                # training cost), over every sample of the epoch, interrupted or not
                f1 = self._f_total()
                if self.rank == 0:
                    row.update(self.validate())
                row["epoch_s"] = ep_before + time.perf_counter() - t_ep
                if self.is_deq:
                    row["f_evals_per_train_sample"] = (f1 - f0) / max(seen, 1)
                history.append(row)
                if self.rank == 0:
                    # Selection: PGD-10 accuracy (ties: clean) for adversarial training; clean
                    # accuracy for standard training. Always on the held-out validation split.
                    keys = ("val_clean", "val_pgd10") if t.method == "standard" else ("val_pgd10", "val_clean")
                    if best is None or tuple(row[k] for k in keys) > tuple(best[k] for k in keys):
                        best = {"epoch": epoch + 1, "val_pgd10": row["val_pgd10"],
                                "val_clean": row["val_clean"]}
                        save_checkpoint(self.model, self.out / "best.pt",
                                        {"epoch": epoch + 1, "selection": best, "config": cfg.to_dict()})
                    wall = wall0 + time.perf_counter() - t_start
                    _atomic_save(self._state(epoch + 1, 0, step, best, history, wall), last)
                    last_save = time.perf_counter()
                    self._write_log(history)
                    if self.progress:
                        tqdm.write(f"epoch {epoch + 1}: loss {row['train_loss']:.4f} "
                                   f"val clean {100 * row['val_clean']:.1f}% "
                                   f"val PGD-10 {100 * row['val_pgd10']:.1f}%")
        if self.is_deq:
            self.model.set_defense(FinalState())  # back to the evaluation forward
        wall = wall0 + time.perf_counter() - t_start
        samples = step * t.batch_size
        return {"name": cfg.name, "best": best, "history": history, "steps": step,
                "wall_s": wall, "samples_per_s": samples / wall if wall > 0 else math.nan,
                "out_dir": str(self.out)}
