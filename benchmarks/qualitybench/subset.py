"""One set of merged tasks: the context every :class:`~.methods.MethodSpec` runs in (merging through mergekit's
registry, validation search, recording rows). The loop over the method table is :func:`.methods.run_subset`;
this module does not import the table, so the table's entries can name :class:`SubsetContext`."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

from ..common import mean


def task_order(tasks, seed: int) -> list:
    """The benchmark's task order for a seed: its subsets of k tasks are the first k (:func:`first_tasks`)."""
    order = list(tasks)
    random.Random(seed).shuffle(order)
    return order


def first_tasks(order: list, k: int, positions: dict) -> list:
    """The subset of ``k`` tasks of a seed's :func:`task_order`, in the task source's order."""
    return sorted(order[:k], key=positions.__getitem__)


def merge(models: dict, method: str, params: dict):
    """(merged state dict, seconds) of a registered mergekit method; ``models["base"]`` is the base."""
    from mergekit.merge_methods import merge_state_dicts

    t0 = time.perf_counter()
    out = merge_state_dicts(models, method, base="base", parameters=params)
    return out, time.perf_counter() - t0


def linear_flags(sd0: dict):
    """The encoder's linear weights by the package's one rule (:mod:`mergekit_wudi.linear_weights`): on a BERT
    encoder exactly the nn.Linear weights (the embeddings, e.g. 30522x384, are NOT linear)."""
    from mergekit.merge_methods import PerGroupValues

    from mergekit_wudi.linear_weights import is_linear_weight

    flags = [is_linear_weight(k, v.shape) for k, v in sd0.items()]
    return PerGroupValues(flags), sum(flags)


def scaled(sd0, merged, s):
    """W0 + s * (merged - W0). For wudi with non_linear=base this equals the merge at scaling=s
    (the kernel applies ``scaling`` to the solved task vector and keeps every other tensor at base)."""
    return {k: (sd0[k] + s * (merged[k] - sd0[k])) if merged[k].is_floating_point() else merged[k] for k in sd0}


@dataclass
class SubsetContext:
    cfg: dict
    evaluator: object  # .accuracy(encoder_sd, heads, split, limit) -> {task: acc}
    sd0: dict
    experts: dict
    heads: dict
    subset: list
    held_out: list
    expert_acc: dict
    log: Callable[[str], None]
    res: dict = field(default_factory=dict)

    def __post_init__(self):
        self.lin, self.n_lin = linear_flags(self.sd0)
        self.models = {"base": self.sd0, **{t: self.experts[t] for t in self.subset}}

    # ---------------------------------------------------------------- scoring
    def _acc(self, sd, tasks, split, limit):
        return self.evaluator.accuracy(sd, {t: self.heads[t] for t in tasks}, split, limit)

    def val(self, sd):
        return self._acc(sd, self.subset, "validation", self.cfg["val_limit"])

    def test(self, sd):
        return self._acc(sd, self.subset, "test", self.cfg["test_limit"])

    def ood(self, sd):
        return self._acc(sd, self.held_out, "test", self.cfg["ood_limit"])

    # ---------------------------------------------------------------- merging and tuning
    def merge(self, method: str, params: dict):
        """(state dict, seconds) of ``method`` on the base and this subset's experts."""
        return merge(self.models, method, params)

    def record(self, name, sd, merge_time, chosen=None, grid=None, with_ood=False):
        """Score ``sd`` on the test split (and the held-out tasks) as the row ``name``."""
        r = {"test": self.test(sd), "merge_seconds": merge_time, "chosen": chosen, "val_grid": grid}
        r["mean_acc"] = mean(r["test"].values())
        r["normalized"] = mean([r["test"][t] / self.expert_acc[t] for t in self.subset])
        if with_ood and self.held_out:
            r["ood_test"] = self.ood(sd)
        self.res[name] = r
        self.log(f"    {name:34s} acc {r['mean_acc']:.4f} norm {r['normalized']:.4f} merge {merge_time:.1f}s"
                 + (f" chosen {chosen}" if chosen else ""))

    def grid_search(self, label, build, values):
        """(best value, its state dict, its seconds, {value: mean val acc}); ``build(v) -> (sd, seconds)``."""
        grid, best = {}, None
        for v in values:
            sd, secs = build(v)
            grid[str(v)] = mean(self.val(sd).values())
            if best is None or grid[str(v)] > best[0]:
                best = (grid[str(v)], v, sd, secs)
        self.log(f"    [{label} val] " + " ".join(f"{k}:{x:.3f}" for k, x in grid.items()))
        return best[1], best[2], best[3], grid

    def lambda_search(self, label, method, params, values, remerge=True):
        """lambda on validation. mergekit's task arithmetic / TIES return base + lambda * mixed_delta, so the
        grid is scored on base + lambda * (merge at lambda 1 - base); the chosen lambda is then merged for
        real through mergekit (that merge is what gets tested and timed)."""
        one, secs1 = self.merge(method, {**params, "lambda": 1.0})
        lam, sd, _, grid = self.grid_search(label, lambda v: (scaled(self.sd0, one, v), 0.0), values)
        if not remerge:  # expensive pre-processing (AWD): the scaled lambda-1 merge is the same model
            return lam, sd, secs1, grid
        sd, secs = self.merge(method, {**params, "lambda": lam})
        return lam, sd, secs, grid


def reference_rows(rec: dict, subset, held_out, ood) -> dict:
    """The expert (upper bound) and pretrained-encoder rows of one subset, from the per-seed scores."""
    expert, pre = rec["expert_test"], rec["pretrained_test"]
    return {
        "expert (own task, upper bound)": {
            "test": {t: expert[t] for t in subset}, "merge_seconds": 0.0,
            "mean_acc": mean([expert[t] for t in subset]), "normalized": 1.0},
        "pretrained encoder": {
            "test": {t: pre[t] for t in subset}, "merge_seconds": 0.0,
            "mean_acc": mean([pre[t] for t in subset]),
            "normalized": mean([pre[t] / expert[t] for t in subset]),
            "ood_test": ood() if held_out else None},
    }
