"""MuDSC benchmark: merge models trained from DIFFERENT random inits on DIFFERENT tasks.

Data: scikit-learn's bundled digits (1797 8x8 images, offline), split into two 5-way tasks:
task A = digits 0-4, task B = digits 5-9 (stratified 60/40 train/test split).
Models: per architecture, model A (seed s) trained on task A only and model B (seed s+1000) on task B
only. Every model has a shared trunk and two heads (``head_a``, ``head_b``); a model trains only its
own task's head. Merges use ``module_weights={"head_a": [1, 0], "head_b": [0, 1]}``: the trunk is
merged, each task keeps its own expert's head (mapped into the merged unit order). Task A is scored
with the merged model's ``head_a``, task B with ``head_b``. BatchNorm statistics are recomputed on the
unlabeled merge data for every merge (also plain averaging). Unlabeled merge data: 8 batches of 64
training images from both tasks, labels never used.

Methods: plain average (no matching), weight-only matching (alpha=1), activation-only (alpha=0),
MuDSC (alpha=0.5), each in ``align`` (Hungarian) and ``zip`` (ZipIt greedy) mode.

    python benchmarks/mudsc.py [--seeds 3] [--out benchmarks/results/mudsc.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mergekit_wudi.mudsc import mudsc_merge


class MLP(nn.Module):
    def __init__(self, width: int = 128):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                   nn.Linear(width, width), nn.ReLU())
        self.head_a = nn.Linear(width, 5)
        self.head_b = nn.Linear(width, 5)

    def forward(self, x):
        z = self.trunk(x.flatten(1))
        return torch.cat([self.head_a(z), self.head_b(z)], dim=1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.n2(self.c2(F.relu(self.n1(self.c1(x))))))


class ResCNN(nn.Module):
    """A tiny ResNet: conv-BN stem, two residual blocks (one shared residual-stream permutation)."""

    def __init__(self, c: int = 32):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.b1, self.b2 = Block(c), Block(c)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head_a = nn.Linear(4 * c, 5)
        self.head_b = nn.Linear(4 * c, 5)

    def forward(self, x):
        z = self.b2(self.b1(F.relu(self.bn(self.stem(x)))))
        z = torch.flatten(self.pool(z), 1)
        return torch.cat([self.head_a(z), self.head_b(z)], dim=1)


ARCHS = {"mlp": MLP, "rescnn": ResCNN}


def load_digits_tasks(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8]
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_train = int(0.6 * len(y))
    split = {"train": (x[:n_train], y[:n_train]), "test": (x[n_train:], y[n_train:])}
    tasks = {}
    for name, lo in (("A", 0), ("B", 5)):
        tasks[name] = {}
        for part, (xx, yy) in split.items():
            keep = (yy >= lo) & (yy < lo + 5)
            tasks[name][part] = (xx[keep], yy[keep] - lo)
    return tasks, split["train"][0]


def train(arch: str, seed: int, task: str, data, epochs: int = 40) -> nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch]()
    x, y = data[task]["train"]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    off = 0 if task == "A" else 5
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx])[:, off:off + 5], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, task: str, data) -> float:
    model.eval()
    x, y = data[task]["test"]
    off = 0 if task == "A" else 5
    return float((model(x)[:, off:off + 5].argmax(1) == y).float().mean())


METHODS = {
    "plain average": dict(mode="average"),
    "weight-only align (alpha=1)": dict(mode="align", alpha=1.0),
    "activation-only align (alpha=0)": dict(mode="align", alpha=0.0),
    "MuDSC align (alpha=0.5)": dict(mode="align", alpha=0.5),
    "weight-only zip (alpha=1)": dict(mode="zip", alpha=1.0),
    "activation-only zip (alpha=0)": dict(mode="zip", alpha=0.0),
    "MuDSC zip (alpha=0.5)": dict(mode="zip", alpha=0.5),
}


ARCH_TITLES = {"mlp": "MLP 64-128-128-128", "rescnn": "ResNet-style CNN with BN"}


def render_table(results: dict) -> list:
    """Markdown lines: one row per method, per architecture its test accuracy on task A / task B / their mean,
    mean over seed pairs (docs/mudsc.md; ``python benchmarks/update_docs.py``)."""
    archs = list(results["archs"])
    lines = ["| method | " + " | ".join(f"{ARCH_TITLES.get(a, a)}: A / B / mean" for a in archs) + " |",
             "|---|" + "---|" * len(archs)]
    for name in results["archs"][archs[0]]:
        cells = [results["archs"][a].get(name) for a in archs]
        lines.append(f"| {name} | " + " | ".join(
            f"{c['task_A']:.3f} / {c['task_B']:.3f} / {c['mean']:.3f}" if c else "" for c in cells) + " |")
    return lines + [""]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "mudsc.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    data, train_x = load_digits_tasks(0)
    g = torch.Generator().manual_seed(0)
    merge_x = train_x[torch.randperm(len(train_x), generator=g)[:512]]
    merge_data = [merge_x[i:i + 64] for i in range(0, 512, 64)]  # unlabeled, both tasks
    head_w = {"head_a": [1, 0], "head_b": [0, 1]}
    results = {"setup": {"dataset": "sklearn digits, task A = 0-4, task B = 5-9", "seeds": args.seeds,
                         "merge_batches": len(merge_data), "batch_size": 64, "torch": torch.__version__,
                         "python": platform.python_version()}, "archs": {}}
    for arch in args.archs:
        rows: dict[str, list] = {"expert A / expert B (own task)": []}
        timing: dict[str, list] = {}
        for s in range(args.seeds):
            ma = train(arch, 1 + s, "A", data)
            mb = train(arch, 1001 + s, "B", data)  # different init, different task
            rows["expert A / expert B (own task)"].append((accuracy(ma, "A", data), accuracy(mb, "B", data)))
            for name, kw in METHODS.items():
                t = time.time()
                merged = mudsc_merge([ma, mb], merge_data, module_weights=head_w, max_batches=8, **kw)
                timing.setdefault(name, []).append(time.time() - t)
                rows.setdefault(name, []).append((accuracy(merged, "A", data), accuracy(merged, "B", data)))
        table = {}
        for name, vals in rows.items():
            a = np.array(vals)
            table[name] = {"task_A": float(a[:, 0].mean()), "task_B": float(a[:, 1].mean()),
                           "mean": float(a.mean()), "mean_std_over_seeds": float(a.mean(1).std()),
                           "per_seed": [list(map(float, v)) for v in vals],
                           "merge_seconds": float(np.mean(timing[name])) if name in timing else None}
        results["archs"][arch] = table
        print(f"\n{arch} (mean over {args.seeds} seed pairs)")
        print("\n".join(render_table({"archs": {arch: table}})))
    results["wall_seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwall {results['wall_seconds']:.1f}s -> {args.out}")
    return results


if __name__ == "__main__":
    main()
