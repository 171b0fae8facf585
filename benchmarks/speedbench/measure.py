"""What the speed benchmark measures: whole-model ``mergekit-yaml`` merges in a wrapper process (wall,
CPU, peak RSS), the Gram-product floor, and the per-weight microbenchmark against the authors' naive loop."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from mergekit_wudi.solvers import wudi as S
from mergekit_wudi.toy import mergekit_yaml_executable
from tests.reference_wudi import naive_wudi_loop

from .models import LOWRANK_STD, NOISE_STD, RANK, linear_shapes

def merge_config(method: str, root: Path, experts: int, **wudi_params) -> dict:
    models = []
    for k in range(experts):
        params = {"weight": 1.0}
        if method == "ties":
            params["density"] = 0.5
        models.append({"model": str(root / f"expert_{k}"), "parameters": params})
    cfg = {"merge_method": method, "base_model": str(root / "base"), "models": models, "dtype": "bfloat16"}
    if method == "wudi":
        cfg["parameters"] = {"scaling": round(1.0 / experts, 6), **wudi_params}
    return cfg


_WRAPPER = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:])
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print("WRAPPER_RESULT " + json.dumps({"rc": rc, "wall_s": wall, "peak_rss_mib": ru.ru_maxrss / 1024,
      "user_s": ru.ru_utime, "sys_s": ru.ru_stime}))
"""


def run_merge(label: str, cfg: dict, cuda: bool, log_dir: Path, cache: Path) -> dict:
    """One ``mergekit-yaml`` run in its own wrapper process (so its peak RSS is its own); the output is deleted."""
    work = cache / "runs" / label
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    import yaml

    (work / "config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    exe = mergekit_yaml_executable()
    cmd = [exe, str(work / "config.yml"), str(work / "out"), "--no-copy-tokenizer", "--no-write-model-card",
           "--quiet"] + (["--cuda"] if cuda else [])
    print(f"[merge] {label} ...", flush=True)
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True)
    (log_dir / f"{label}.log").write_text(proc.stdout + "\n---stderr---\n" + proc.stderr)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WRAPPER_RESULT ")]
    res = json.loads(line[-1].split(" ", 1)[1]) if line else {"rc": proc.returncode, "wall_s": float("nan"),
                                                               "peak_rss_mib": float("nan")}
    res["ok"] = res["rc"] == 0 and any((work / "out").glob("*.safetensors"))
    if not res["ok"]:
        print(proc.stderr[-3000:], file=sys.stderr)
    print(f"[merge] {label}: {'ok' if res['ok'] else 'FAILED'} {res['wall_s']:.1f} s, "
          f"peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------------- floor


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def gram_floor(layers: int, experts: int, device, shapes=None, with_eigh: bool = False,
               with_solver: bool = False) -> dict:
    """Time of the float32 Gram product alone (cheaper space) for every linear weight (``shapes``, default the
    0.5B model's ``layers`` layers), and Gram + Cholesky. ``with_eigh``: Gram + eigh too. ``with_solver``: the
    exact ``closed_form`` solver itself on in-memory float32 task vectors (Gram, right-hand side, Cholesky and
    solve: the arithmetic it cannot skip), timed once per distinct shape like the rest."""
    counts: dict[tuple[int, int], int] = {}
    for s in shapes if shapes is not None else linear_shapes(layers):
        counts[s] = counts.get(s, 0) + 1
    rows, g_total, gc_total, ge_total, solve_total = [], 0.0, 0.0, 0.0, 0.0
    for (out, inp), n in counts.items():
        r = experts * out
        x = torch.randn(inp, r, device=device)  # X = [sqrt(w_i) tau_i^T]
        if r < inp:  # dual: G = X^T X, r x r
            g = _time(lambda: x.T @ x, device, 2)
            gram = x.T @ x
            size = r
        else:  # primal: C = X X^T, in x in
            g = _time(lambda: x @ x.T, device, 2)
            gram = x @ x.T
            size = inp
        gram.diagonal().add_(float(gram.diagonal().mean()) * 1e-3)
        c = _time(lambda: torch.linalg.cholesky(gram), device, 2)
        e = _time(lambda: torch.linalg.eigh(gram), device, 1) if with_eigh else float("nan")
        del x, gram
        solve = float("nan")
        if with_solver:
            tvs = make_task_vectors(experts, out, inp, device)
            solve = _time(lambda: S.wudi_merged_task_vector(tvs, "closed_form"), device, 1)
            del tvs
        rows.append({"shape": [out, inp], "count": n, "space": "dual" if r < inp else "primal", "gram_size": size,
                     "gram_s": g, "cholesky_s": c, "eigh_s": e, "closed_form_solver_s": solve})
        g_total += n * g
        gc_total += n * (g + c)
        ge_total += n * (g + e)
        solve_total += n * solve
    out = {"rows": rows, "gram_total_s": g_total, "gram_plus_cholesky_total_s": gc_total}
    if with_eigh:
        out["gram_plus_eigh_total_s"] = ge_total
    if with_solver:
        out["closed_form_solver_total_s"] = solve_total
    return out


# --------------------------------------------------------------------------------------------- micro


def make_task_vectors(T: int, out: int, inp: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(T, out, RANK, generator=g)
    b = torch.randn(T, RANK, inp, generator=g)
    tv = (a @ b) * (LOWRANK_STD / math.sqrt(RANK)) + NOISE_STD * torch.randn(T, out, inp, generator=g)
    return tv.to(device)


def microbench(rows_spec, device) -> list[dict]:
    rows = []
    for out, inp, T, iters in rows_spec:
        tv = make_task_vectors(T, out, inp, device)
        init = tv.sum(0)
        print(f"[micro] {out}x{inp} T={T}: naive loop, {iters} iterations ...", flush=True)
        keep = {}
        t_naive = _time(lambda: keep.__setitem__("ref", naive_wudi_loop(tv, iterations=iters)), device)
        t_adam = _time(lambda: keep.__setitem__("got", S.wudi_merged_task_vector(tv, "adam", iterations=iters)),
                       device, 2)
        ref, got = keep.pop("ref"), keep.pop("got")
        t_closed = _time(lambda: S.wudi_merged_task_vector(tv, "closed_form"), device, 2)
        t_spec = _time(lambda: S.wudi_merged_task_vector(tv, "spectral"), device, 2)
        prob = S.wudi_problem(tv)
        space = "dual" if prob.dual else "primal"
        del prob
        diff = float((got - ref).abs().max())
        row = {
            "shape": [out, inp], "experts": T, "iterations": iters,
            "naive_s": t_naive, "adam_s": t_adam, "closed_form_s": t_closed, "spectral_s": t_spec,
            "naive_per_iter_s": t_naive / iters, "adam_per_iter_s": t_adam / iters,
            "adam_speedup_vs_naive": t_naive / t_adam,
            "adam_space": space,
            "adam_max_rel_diff": diff / float(ref.abs().max()),
            "adam_max_rel_diff_of_update": diff / max(float((ref - init).abs().max()), 1e-30),
        }
        print(f"[micro] {out}x{inp} T={T} it={iters}: naive {t_naive:.2f}s adam {t_adam:.2f}s "
              f"(x{row['adam_speedup_vs_naive']:.1f}, rel diff {row['adam_max_rel_diff']:.1e}, of update "
              f"{row['adam_max_rel_diff_of_update']:.1e}) closed {t_closed:.2f}s spectral {t_spec:.2f}s", flush=True)
        rows.append(row)
        del tv, init, ref, got
    return rows


def layer_flops_ratio(experts: int = 3) -> dict:
    """Multiply-adds per Adam iteration for one Qwen2.5-0.5B-shaped transformer layer: naive vs C/D form."""
    naive = cd = 0
    for out, inp in linear_shapes(1):
        r = experts * out
        naive += 2 * out * inp * r  # forward T products out x in x out, and one backward product
        cd += min(out * inp * inp, 2 * out * inp * r)
    return {"naive_macs": naive, "adam_macs": cd, "ratio": naive / cd}
