"""Train the two bring-your-own example models briefly on Fashion-MNIST and write their weights
(state_dicts, loadable with ``weights_only=True``) with SHA-256 files next to them.

    python examples/byo/train_byo.py --out tests/data/byo [--steps 400]

Clean training with Adam (lr 2e-3, batch 64) on the training split of ``benchmark.data`` (the
validation part held out); torchdeq's own training forward (phantom gradient, 1 step) for the DEQ.
"""
import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from benchmark.data import load_dataset  # noqa: E402
from cnn_fmnist import SmallNet  # noqa: E402
from torchdeq_fmnist import TinyTorchDEQ  # noqa: E402


def train(net, ds, steps, seed, lr=2e-3, bs=64):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        idx = torch.randint(len(ds), (bs,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(ds.images[idx]), ds.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"{type(net).__name__} step {step} loss {loss.item():.3f}", flush=True)
    return net.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/byo")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    ds = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    for name, net in (("torchdeq_fmnist", TinyTorchDEQ()), ("cnn_fmnist", SmallNet())):
        t0 = time.time()
        train(net, ds, a.steps, a.seed)
        with torch.no_grad():
            acc = (net(test.images[:1000]).argmax(1) == test.labels[:1000]).float().mean().item()
        path = out / f"{name}.pt"
        torch.save(net.state_dict(), path)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        (out / f"{name}.pt.sha256").write_text(f"{sha}  {name}.pt\n")
        print(f"{name}: {a.steps} steps in {time.time() - t0:.0f} s, clean accuracy on the first "
              f"1000 test images {100 * acc:.1f}%, sha256 {sha}")


if __name__ == "__main__":
    main()
