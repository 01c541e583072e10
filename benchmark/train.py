"""``deqbench train CONFIG``: data loading, (distributed) set-up and the run summary around
``model_zoo.training.Trainer``.

Distributed: launch with ``torchrun --nproc_per_node=W -m benchmark.cli train CONFIG``; each
process trains on its shard of every global batch under DistributedDataParallel (gloo on CPU,
nccl on CUDA). The result equals a single-process run with ``--shards W``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

import model_zoo
from benchmark.data import load_dataset, make_loader, subset
from benchmark.provenance import provenance
from model_zoo.train_config import TrainConfig, load_train_config
from model_zoo.training import Trainer


def build_data(cfg: TrainConfig):
    d = cfg.data
    kw = dict(root=d.root, val_size=d.val_size, val_seed=d.val_seed, **d.options)
    train = load_dataset(d.dataset, "train", **kw)
    if d.train_subset is not None and d.train_subset < len(train):
        train = subset(train, d.train_subset, seed=cfg.seed, stratified=True)
    val = load_dataset(d.dataset, "val", **kw)
    val = subset(val, min(d.val_n, len(val)), seed=d.val_seed, stratified=True)
    return train, val


def run_training(cfg: TrainConfig, resume: bool = False, device: Optional[str] = None,
                 shards: int = 1, progress: bool = True, stop_after: Optional[int] = None,
                 checkpoint_every_s: Optional[float] = 600.0) -> dict:
    from model_zoo.scoring import resolve_device
    device = resolve_device(device or cfg.device)  # 'auto': CUDA when available, else CPU
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    ddp_model = None
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if str(device).startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    torch.manual_seed(cfg.seed)
    overrides = dict(cfg.model_overrides)
    if cfg.solver:
        overrides["solver"] = {"name": "broyden", **cfg.solver}
    model = model_zoo.create(cfg.model, **overrides)
    if cfg.train.init_from:
        from model_zoo.registry import _read_state_dict, load_state_dict_checked, registered_sha256
        src = Path(cfg.train.init_from)
        load_state_dict_checked(model, _read_state_dict(src, registered_sha256(src)),
                                cfg.train.init_from)
    model = model.to(device)
    if world > 1:
        # BatchNorm statistics are averaged over all shards by the trainer itself
        # (model_zoo.training._BatchNormSync), not broadcast from rank 0.
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    train, val = build_data(cfg)
    out_dir = Path(cfg.output) / cfg.name

    def loader_for_epoch(epoch):
        return make_loader(train, cfg.train.batch_size, shuffle=True,
                           seed=cfg.seed * 100_003 + epoch, augment=cfg.data.augment)

    trainer = Trainer(cfg, model, loader_for_epoch, val.images, val.labels, out_dir, device=device,
                      rank=rank, world=world, ddp_model=ddp_model, shards=shards, progress=progress,
                      checkpoint_every_s=checkpoint_every_s)
    summary = trainer.fit(resume=resume, stop_after=stop_after)
    summary.update({"train_samples": len(train), "val_samples": len(val),
                    "parameters": model.num_parameters() if hasattr(model, "num_parameters") else None,
                    "world_size": world, "shards": shards, "config": cfg.to_dict(),
                    "provenance": provenance(device)})
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def train_from_file(path, resume=False, device=None, shards=1) -> dict:
    return run_training(load_train_config(path), resume=resume, device=device, shards=shards)
