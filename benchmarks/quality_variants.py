"""Validation-split screen of data-free WUDI variants against the tuned baselines (issue 21, Part 1).

    HF_HUB_OFFLINE=1 python benchmarks/quality_variants.py --kind full --seeds 0 --subsets 7 \\
        --cache-dir /work/cache-quality --out variants_full.json

Scores every variant on the VALIDATION split only (the same capped split the quality benchmark tunes on), so
that a configuration can be chosen without touching the test split; the chosen one then gets its test rows in
``benchmarks/quality.py``. ``--kind full`` uses the cached full fine-tunes (never trains them: run
``benchmarks/quality.py --train-only`` first), ``--kind lora`` / ``lora_shared`` the LoRA experts of the two
init regimes (trained and cached if missing, as ``benchmarks/quality.py --lora [--lora-init shared]`` does).

Variants (per nn.Linear weight; every other tensor stays at the base, as WUDI's kernel does):
- ``closed_form``: the exact minimiser of Eq. 1 (ridge 1e-2), ``spectral t=8``: the flow at t = 8; ``adam``: the
  authors' algorithm; ``closed_form rank k`` / ``spectral rank auto``: the low-rank path (each task vector cut to
  its top-k singular triplets, ``auto``: 90% of its energy, at most 8);
- ``gram power p xa``: ``a U (U^T U + eps)^-p S (V^T V + eps)^-p V^T`` over the stacked per-task top-(min/T) SVD
  triplets (p = 1/2: TSV-M's whitening; p = 1: each side's projector-Gram minimiser of Eq. 1);
- ``decorrelated prior c``: WUDI's ``solver: decorrelated`` (Eq. 1 with an isotropic prior c on TSV-decorrelated
  task vectors, ``(1 + c) / (1 + c T)`` x TSV-M), through :func:`mergekit_wudi.solvers.wudi.merge_task_vectors`;
- ``closed_form flat xa``: Iso-C's flat spectrum applied to the ``closed_form`` solution, times ``a``;
- ``closed_form flat rms-level`` / ``energy-level``, ``iso_c rms-level`` / ``energy-level``: the flat spectrum of
  the ``closed_form`` solution / of the task-vector sum at a level set without data (:func:`flat_spectrum`);
- ``<iso_c | iso_cts | tsv_merge | closed_form flat> eq1-scale``: that method's merged direction at the scale that
  minimises Eq. 1 along it (:func:`eq1_scaled`: no validation split);
- ``ace``: ACE-Merging (arXiv 2603.02945) as its authors' code computes it (:func:`ace_merge`); ``ace
  always-refine`` with its spectral refinement forced on; ``closed_form ace-refine``: that refinement added to the
  ``closed_form`` solution;
- ``decorrelated tsv-triplets prior c``: its first version, on TSV-M's own triplets (for a low-rank update the zero
  singular values' arbitrary singular vectors enter the polar factors);
and the baselines at every point of their validation grid: task arithmetic (lambda), TIES (d 0.2, lambda),
Iso-C, Iso-CTS and TSV-M (alpha in ``benchmarks.baselines.ALPHAS_REFERENCE``, ``ALPHAS_LORA`` for LoRA
experts; the registered methods on every 2-D tensor, others averaged as in the authors' code). Output:
``{seed: {k: {variant: val accuracy}}}`` in ``--out`` and a table on stdout. The variants an
earlier version of this screen also ran (an isotropic prior on the proxy Gram of ``closed_form``, the output-Gram
proxy, both sides) needed solver options that lost and were not kept; their screens are in
``benchmarks/results/issue21/`` (``screen_*``, ``val_*``), produced at commit 2fac84c of branch quality-defaults.

``--test-out FILE``: then the test rows, in the quality benchmark's results layout (so that
``benchmarks/qualitybench/report.py`` computes ``summary.claims`` from them): task arithmetic, TIES, Iso-C,
Iso-CTS, TSV-M at the grid point validation chose, and WUDI ``closed_form`` and ``decorrelated`` at their
defaults (nothing tuned), merged through mergekit's registry and timed; normalized by each expert's own test
accuracy (``--test-limit`` texts per task).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import mean  # noqa: E402
from benchmarks.qualitybench import report  # noqa: E402

# Full fine-tunes: also the authors' algorithm (WUDI's YAML default), the spectral flow at its default time and
# README's first YAML (its low-rank fast path), under the quality benchmark's row names.
def _full_extra_rows():
    from mergekit_wudi.solvers.wudi import FLOW_TIME, RANK_ENERGY
    from mergekit_wudi.solvers.wudi_lowrank import AUTO_MAX_RANK

    return ((report.DEFAULT_ROW, {"solver": "adam"}),
            ("wudi decorrelated (prior 0)", {"solver": "decorrelated", "prior": 0.0}),  # TSV-M on the linear weights
            (f"wudi spectral (flow_time {FLOW_TIME:g})", {"solver": "spectral"}),
            (f"wudi spectral (rank auto <= {AUTO_MAX_RANK}, energy {RANK_ENERGY:g})", {"solver": "spectral", "rank": "auto"}))


FULL_EXTRA_ROWS = _full_extra_rows()
TA_GRID = [0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
TIES_GRID = [0.5, 1.0, 1.5, 2.0, 3.0]


def scaled(sd0, merged, s):
    return {k: (sd0[k] + s * (merged[k] - sd0[k])) if merged[k].is_floating_point() else merged[k] for k in sd0}


def linear_merge(sd0, experts, solve):
    """W0 + solve(task vectors) on every nn.Linear weight, base elsewhere; (state dict, seconds)."""
    from mergekit_wudi.linear_weights import is_linear_weight

    t0 = time.perf_counter()
    out = {}
    for k, w0 in sd0.items():
        if is_linear_weight(k, w0.shape):
            tvs = torch.stack([e[k].float() - w0.float() for e in experts])
            out[k] = (w0.float() + solve(tvs)).to(w0.dtype)
        else:
            out[k] = w0.clone()
    return out, time.perf_counter() - t0


def variants():
    from mergekit_wudi.solvers.subspace_merging import iso_c_merged_task_vector
    from mergekit_wudi.solvers.wudi import merge_task_vectors

    def solver(**opts):
        return lambda tvs: merge_task_vectors(torch.zeros_like(tvs[0]), tvs, **opts)

    out = {"closed_form": solver(solver="closed_form"), "spectral t=8": solver(solver="spectral")}
    out["adam"] = solver(solver="adam")  # the authors' algorithm (WUDI's YAML default)
    for rank in (8, 32, "auto"):  # the low-rank path: each task vector cut to its top singular triplets first
        out[f"closed_form rank {rank}"] = solver(solver="closed_form", rank=rank)
    out["spectral rank auto"] = solver(solver="spectral", rank="auto")
    for p in (0.5, 0.75, 1.0):
        for a in (0.5, 0.75, 1.0):
            out[f"gram power {p:g} x{a:g}"] = (lambda p, a: lambda tvs: a * gram_power_merge(tvs, p))(p, a)
    for c in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5):  # 0: TSV-M (full-rank task vectors)
        out[f"decorrelated prior {c:g}"] = solver(solver="decorrelated", prior=c)
    for c in (0.1, 0.2, 0.3):
        out[f"decorrelated tsv-triplets prior {c:g}"] = (lambda c: lambda tvs: decorrelated_tsv_triplets(tvs, c))(c)
    closed = solver(solver="closed_form")
    out["ace"] = ace_merge
    out["ace always-refine"] = lambda tvs: ace_merge(tvs, refine=True)
    out["closed_form ace-refine"] = lambda tvs: ace_merge(tvs, refine=True, base=closed(tvs))
    for a in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0):
        out[f"closed_form flat x{a:g}"] = (lambda a: lambda tvs: a * iso_c_merged_task_vector(closed(tvs)[None]))(a)
    from mergekit_wudi.solvers.subspace_merging import iso_cts_merged_task_vector, tsv_merged_task_vector

    directions = {"iso_c": iso_c_merged_task_vector, "iso_cts": iso_cts_merged_task_vector,
                  "tsv_merge": tsv_merged_task_vector, "closed_form flat": lambda tvs: iso_c_merged_task_vector(
                      closed(tvs)[None])}
    for name, direction in directions.items():
        out[f"{name} eq1-scale"] = (lambda d: lambda tvs: eq1_scaled(d(tvs), tvs))(direction)
    for level in ("rms", "energy"):
        out[f"closed_form flat {level}-level"] = (lambda lv: lambda tvs: flat_spectrum(closed(tvs), lv))(level)
        out[f"iso_c {level}-level"] = (lambda lv: lambda tvs: flat_spectrum(tvs.sum(0), lv))(level)
    return out


def gram_power_merge(tvs, p, eps=1e-2):
    """``U (U^T U + eps)^-p S (V^T V + eps)^-p V^T`` over TSV-M's stacked per-task triplets."""
    from mergekit_wudi.solvers.subspace_merging import _per_task_rank, _stacked_low_rank

    u, s, vh = _stacked_low_rank(tvs, _per_task_rank(tvs, None))

    def whiten(m):
        pm, sm, qh = torch.linalg.svd(m, full_matrices=False)
        return (pm * (sm * (sm * sm + eps) ** (-p))) @ qh

    return (whiten(u) * s) @ whiten(vh)


def eq1_scaled(direction, tvs):
    """``a * direction`` with the scale ``a`` that minimises Eq. 1 along it: ``<M, D> / <M C, M>`` with WUDI's
    primal ``C = sum_i w_i G_i`` and ``D = sum_i w_i tau_i G_i`` (:func:`mergekit_wudi.solvers.wudi.wudi_problem`)."""
    from mergekit_wudi.solvers.wudi import wudi_problem

    problem = wudi_problem(tvs, dual=False)
    den = float(((direction @ problem.C) * direction).sum())
    return direction * (float((direction * problem.D).sum()) / den) if den > 0 else torch.zeros_like(direction)


def flat_spectrum(m, level):
    """``m``'s singular vectors with one singular value: the root mean square of its singular values (``"rms"``:
    the Frobenius norm kept) or their energy-weighted mean ``sum s^2 / sum s`` (``"energy"``: the mean singular
    value over the participation-ratio rank instead of over all ``min(out, in)`` values as Iso-C's)."""
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    total = sv.sum()
    if float(total) == 0.0:
        return torch.zeros_like(m)
    value = sv.pow(2).mean().sqrt() if level == "rms" else sv.pow(2).sum() / total
    return value * (u @ vh)


def ace_merge(tvs, eps=1e-2, k_frac=0.3, refine=None, base=None):
    """ACE-Merging (arXiv 2603.02945), as its authors' ``ace_merging`` computes it: per-task covariance
    ``S_t = Wc_t^T Wc_t`` of the row-centred task vector (trace-normalised, and the ridge with it, when the log
    traces vary: ``var / mean^2 > 0.3``), ``W_0 = sum Wc_t (S_t + eps_t I) (sum (S_t + eps_t I) + 1 m^T)^-1``
    with ``m`` the column mean of ``sum S_t``; then, in the heterogeneous case, a flat-spectrum refinement: the
    top ``k_frac`` singular directions of ``W_0 + sum tau_t (S_t - mean S)`` added at their mean singular value.
    ``refine=True`` forces the refinement (and the normalisation); ``base`` replaces ``W_0``."""
    t, _, n = tvs.shape
    traces = tvs.flatten(1).pow(2).sum(1)
    logs = torch.log(traces + 1e-12)
    hetero = bool(torch.var(logs) / (logs.mean() ** 2 + 1e-12) > 0.3) if refine is None else refine
    eye = torch.eye(n, dtype=tvs.dtype)
    sigmas, lhs, rhs = [], torch.zeros(n, n, dtype=tvs.dtype), torch.zeros_like(tvs[0])
    for w in tvs:
        wc = w - w.mean(0, keepdim=True)
        s = wc.T @ wc
        tr = s.trace() + 1e-12
        s, e = (s / tr, eps / tr) if hetero else (s, eps)
        sigmas.append(s)
        rhs += wc @ (s + e * eye)
        lhs += s + e * eye
    total = sum(sigmas)
    agg = total.mean(0, keepdim=True) / ((traces.mean() + 1e-12) if hetero else 1.0)
    w0 = rhs @ torch.linalg.inv(lhs + agg) if base is None else base
    if not hetero:
        return w0
    mean_s = total / t
    fused = w0 + sum(w @ (s - mean_s) for w, s in zip(tvs, sigmas))
    u, sv, vh = torch.linalg.svd(fused, full_matrices=False)
    k = int(sv.numel() * k_frac)
    return w0 + sv[:k].mean() * (u[:, :k] @ vh[:k])


def decorrelated_tsv_triplets(tvs, c):
    """The first version of ``solver: decorrelated``: TSV-M's own triplets (``min(out, in) / T`` per task, zero
    singular values and their arbitrary singular vectors included), times ``(1 + c) / (1 + c T)``."""
    from mergekit_wudi.solvers.subspace_merging import tsv_merged_task_vector

    return (1 + c) / (1 + c * tvs.shape[0]) * tsv_merged_task_vector(tvs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["full", "lora", "lora_shared", "lora_callback"], default="full")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--subsets", type=int, nargs="+", default=[7])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="variant / baseline names to run (default: all)")
    p.add_argument("--exact", action="store_true", help="--only names whole rows, not prefixes")
    p.add_argument("--out", required=True)
    p.add_argument("--test-out", default=None, help="also score the test rows into this results file")
    p.add_argument("--test-limit", type=int, default=None, help="test texts per task (default: all)")
    p.add_argument("--extra-rows", nargs="*", default=None, metavar="ROW",
                   help="score only these WUDI test rows (of closed_form, decorrelated and, for full fine-tunes, "
                        "FULL_EXTRA_ROWS; default: all)")
    p.add_argument("--steps", type=int, default=None,
                   help="fine-tuning steps of the cached full experts to load (default: the benchmark's 50; "
                        "train others with `quality.py --train-only --steps N`)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.baselines import SUBSPACE_METHODS
    from benchmarks.qualitybench import run as qrun
    from benchmarks.qualitybench.evaluate import Evaluator
    from benchmarks.qualitybench.experts import expert_path, load_expert
    from benchmarks.qualitybench.model import load_encoder, tokenised
    from benchmarks.qualitybench.subset import first_tasks, task_order
    from benchmarks.qualitybench.tasks import load_tasks

    cache = Path(args.cache_dir)
    all_tasks, quick = load_tasks(qrun.DEFAULT_SOURCE, qrun.DATA_SEED)
    steps = ["--steps", str(args.steps)] if args.steps else []
    cfg = qrun.build_config(qrun.parse_args(["--seeds", *map(str, args.seeds), *steps]), list(all_tasks), quick)
    positions = {t: list(all_tasks).index(t) for t in all_tasks}
    data = tokenised(all_tasks, cfg["max_length"], cache, cfg["model"])
    ev = Evaluator(data, cfg["model"])
    sd0 = {k: v.detach().clone() for k, v in load_encoder(cfg["model"]).state_dict().items()}
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    wanted = (lambda name: True) if args.only is None else (lambda name: any(
        name == o if args.exact else name.startswith(o) for o in args.only))

    section_key = {"full": "seeds", "lora": "lora", "lora_shared": "lora_shared_init", "lora_callback": "lora_callback"}
    test_path = Path(args.test_out) if args.test_out else None
    tests = json.loads(test_path.read_text()) if test_path and test_path.exists() else {
        "command": "HF_HUB_OFFLINE=1 python benchmarks/quality_variants.py " + " ".join(argv or sys.argv[1:]),
        "config": {**cfg, "test_limit": args.test_limit}, "seeds": {}}
    section = tests if args.kind == "full" else tests.setdefault(
        section_key[args.kind], {"config": {"lora": None, "lr_encoder": None}, "seeds": {}})

    for seed in args.seeds:
        a_grams = None
        if args.kind == "full":
            experts, heads = {}, {}
            for t in all_tasks:
                path = expert_path(cfg, cache, all_tasks[t], seed, positions[t])
                if not path.exists():
                    sys.exit(f"error: no cached full expert {t} seed {seed} ({path}); train it first")
                experts[t], heads[t], _ = load_expert(path)
        else:
            from benchmarks.qualitybench.lora import lora_config, lora_experts

            init = {"lora": "independent", "lora_shared": "shared", "lora_callback": "callback"}[args.kind]
            lcfg = lora_config({**cfg, "lora_init": init})
            experts, heads, _ = lora_experts(lcfg, cache, data, all_tasks, positions, seed, print)
            if init == "callback":
                from benchmarks.qualitybench.lora import a_update_grams

                a_grams = a_update_grams(lcfg, cache, all_tasks, positions, seed)
            section["config"] = {"lora": lcfg["lora"], "lr_encoder": lcfg["lr_encoder"], "lora_init": init}
        order = task_order(cfg["tasks"], seed)
        for k in args.subsets:
            subset = first_tasks(order, k, positions)
            res = results.setdefault(str(seed), {}).setdefault(str(k), {})
            exps = [experts[t] for t in subset]

            def val(sd):
                acc = ev.accuracy(sd, {t: heads[t] for t in subset}, "validation", cfg["val_limit"])
                return mean(acc.values())

            test_rows = {}

            def grid(name, merged, values, row=None, seconds=0.0):
                if not wanted(name):
                    return
                for v in values:
                    if f"{name} @{v:g}" not in res:  # kept from an earlier run of the same --out
                        res[f"{name} @{v:g}"] = val(scaled(sd0, merged, v))
                best = max(values, key=lambda v: res[f"{name} @{v:g}"])
                print(f"seed {seed} k {k} {name}: best @{best:g} {res[f'{name} @{best:g}']:.4f}", flush=True)
                if row:
                    test_rows[row] = (scaled(sd0, merged, best), seconds, {"scale": best})
                if row and name in SUBSPACE_METHODS:  # also at alpha 1: what a user without a validation split gets
                    test_rows[f"{name} (alpha 1, untuned)"] = (merged, seconds, {"scale": 1.0})

            t0 = time.perf_counter()
            summed = {key: (w0 + sum(e[key] - w0 for e in exps)) if w0.is_floating_point() else w0
                      for key, w0 in sd0.items()}
            grid("task_arithmetic", summed, TA_GRID, report.TA_ROW, time.perf_counter() - t0)
            if any(wanted(n) for n in ("ties", "iso_c", "iso_cts", "tsv_merge")):
                from mergekit.merge_methods import merge_state_dicts

                from benchmarks.baselines import ALPHAS_LORA, ALPHAS_REFERENCE, authors_matrices, mergekit_merge

                from mergekit_wudi.solvers.subspace_merging import ISO_CTS_COMMON_SPACE_FRACTION

                if wanted("ties"):
                    models = {"base": sd0, **{t: experts[t] for t in subset}}
                    t0 = time.perf_counter()
                    ties = merge_state_dicts(models, "ties", base="base",
                                             parameters={"weight": 1.0, "density": 0.2, "lambda": 1.0})
                    grid("ties", ties, TIES_GRID, report.TIES_ROW, time.perf_counter() - t0)
                for name in SUBSPACE_METHODS:
                    if wanted(name):  # the registered methods, on every 2-D tensor, others averaged (the authors')
                        params = {"common_space_fraction": ISO_CTS_COMMON_SPACE_FRACTION} if name == "iso_cts" else {}
                        t0 = time.perf_counter()
                        merged = mergekit_merge(name, stochastic=False, linear=authors_matrices)(
                            sd0, {t: experts[t] for t in subset}, {"alpha": 1.0, **params}, seed)
                        alphas = ALPHAS_REFERENCE if args.kind == "full" else ALPHAS_LORA
                        grid(name, merged, alphas, f"{name} (val grid)", time.perf_counter() - t0)
            for name, solve in variants().items():
                if not wanted(name):
                    continue
                sd, secs = linear_merge(sd0, exps, solve)
                res[name] = val(sd)
                res[f"_{name} seconds"] = secs
                print(f"seed {seed} k {k} {name}: {res[name]:.4f} ({secs:.1f}s)", flush=True)
                if name == "closed_form":
                    for s in (0.5, 0.75):
                        res[f"{name} x{s:g}"] = val(scaled(sd0, sd, s))
            out_path.write_text(json.dumps(results, indent=1))
            if test_path:
                score_test_rows(section, seed, k, subset, sd0, experts, heads, ev, args.test_limit, test_rows,
                                FULL_EXTRA_ROWS if args.kind == "full" else (), args.extra_rows, a_grams)
                from mergekit_wudi.io import atomic_file

                with atomic_file(test_path) as tmp:
                    Path(tmp).write_text(json.dumps(tests, indent=1))
    if test_path:
        report.write_report(tests, test_path.stem, print, test_path.parent)
    return 0


def score_test_rows(section, seed, k, subset, sd0, experts, heads, ev, limit, test_rows, extra_wudi_rows=(),
                    only_rows=None, a_grams=None) -> None:
    """The test rows of one (seed, subset) into ``section`` (the benchmark's layout): the baselines at their
    validation-chosen point, WUDI ``closed_form`` and ``decorrelated`` at their defaults, and ``extra_wudi_rows``
    (``(row, wudi parameters)``: full fine-tunes add :data:`FULL_EXTRA_ROWS`); ``only_rows``: score only these
    WUDI rows (``--extra-rows``). ``a_grams`` (the callback path's LoRA experts): also the callback's default
    merge, Eq. 1 with each expert's LoRA A-update Grams (:data:`A_UPDATES_ROW`)."""
    from benchmarks.qualitybench.methods import A_UPDATES_ROW, linear_flags, merge

    models = {"base": sd0, **{t: experts[t] for t in subset}}
    lin, _ = linear_flags(sd0)
    wudi_rows = ((report.CLOSED_FORM_ROW, {"solver": "closed_form"}), (report.DECORRELATED_ROW, {"solver": "decorrelated"}),
                 *extra_wudi_rows)
    for row, params in [r for r in wudi_rows if only_rows is None or r[0] in only_rows]:
        sd, secs = merge(models, "wudi", {**params, "linear": lin})
        test_rows[row] = (sd, secs, params)
    if a_grams is not None and (only_rows is None or A_UPDATES_ROW in only_rows):
        from benchmarks.qualitybench.lora import callback_default_merge

        sd, secs = callback_default_merge(sd0, [experts[t] for t in subset], [a_grams[t] for t in subset])
        test_rows[A_UPDATES_ROW] = (sd, secs, {"lora_a_updates": True})
    rec = section["seeds"].setdefault(str(seed), {"subsets": {}})
    if "expert_test" not in rec:
        rec["expert_test"] = {}
    for t in subset:
        if t not in rec["expert_test"]:
            rec["expert_test"][t] = ev.accuracy(experts[t], {t: heads[t]}, "test", limit)[t]
    methods = rec["subsets"].setdefault(str(k), {"tasks": subset, "methods": {}})["methods"]
    for row, (sd, secs, chosen) in test_rows.items():
        acc = ev.accuracy(sd, {t: heads[t] for t in subset}, "test", limit)
        methods[row] = {"test": acc, "merge_seconds": secs, "chosen": chosen, "mean_acc": mean(acc.values()),
                        "normalized": mean([acc[t] / rec["expert_test"][t] for t in subset])}
        print(f"seed {seed} k {k} TEST {row}: norm {methods[row]['normalized']:.4f} ({secs:.1f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
