#!/usr/bin/env python
"""Speed / scale benchmark of ``merge_method: wudi`` (issue 3). Not a test: it takes minutes.

What it does, offline, in ONE invocation (so that ratios compare like with like on a shared machine):

1. Builds (and caches under ``benchmarks/cache/``) an LLM-shaped model: Qwen2.5-0.5B's config (hidden 896,
   intermediate 4864, GQA 14/2 heads, vocab 151936, tied embeddings) with random bf16 base weights and 3 experts
   = base + rank-8 delta + small dense noise per 2-D weight (small noise on 1-D weights), as safetensors.
2. Runs the real ``mergekit-yaml`` for task_arithmetic, ties and wudi with each solver, each merge in its own
   wrapper process so that its peak RSS (getrusage of the child) is that merge's own. ``adam`` and ``lowrank``
   would take hours on CPU for the whole model: they run on a 1-layer model built the same way, next to
   task_arithmetic on that same model, and the full-model time is EXTRAPOLATED (labelled as such).
3. Times the floor: the float32 Gram product of every linear weight of the model (in the cheaper space), and the
   Gram plus a Cholesky solve.
4. Per-layer microbenchmark: the authors' naive loop (tests/reference_wudi.py) vs ``adam`` vs ``closed_form`` vs
   ``spectral`` on 1024x1024, 4864x896 and 896x4864 weights with 3-8 experts; max relative difference of ``adam``
   vs the naive loop.
5. Writes ``benchmarks/results/speed.json`` and ``benchmarks/results/speed.md`` (README tables, machine named).

    python benchmarks/speed.py            # full: 24 layers (~15-25 min on 2 busy CPU cores)
    python benchmarks/speed.py --quick    # 2 layers, short microbenchmark (a few minutes)
    python benchmarks/speed.py --cuda     # passes --cuda to mergekit-yaml and runs the microbenchmark on GPU
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.reference_wudi import naive_wudi_loop  # noqa: E402

from mergekit_wudi.solvers import wudi as S  # noqa: E402
from mergekit_wudi.toy import mergekit_yaml_executable  # noqa: E402

CACHE = REPO / "benchmarks" / "cache"
RESULTS = REPO / "benchmarks" / "results"

QWEN = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
RANK = 8
BASE_STD = 0.02
LOWRANK_STD = 2e-3  # entry std of the rank-8 delta
NOISE_STD = 2e-4  # entry std of the dense noise (about bf16's rounding at 0.02)


# --------------------------------------------------------------------------------------------- model


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, i = QWEN["hidden_size"], QWEN["intermediate_size"]
    kv = QWEN["num_key_value_heads"] * (h // QWEN["num_attention_heads"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (QWEN["vocab_size"], h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    return shapes


def linear_shapes(layers: int) -> list[tuple[int, int]]:
    """[out, in] of every weight WUDI solves (2-D, no vocabulary axis)."""
    return [s for n, s in tensor_shapes(layers).items() if len(s) == 2 and "embed_tokens" not in n]


def build_models(layers: int, experts: int = 3, seed: int = 0) -> Path:
    """base + experts under benchmarks/cache/, keyed by config; skipped when already there."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    key = f"qwen2.5-0.5b-shape_L{layers}_E{experts}_r{RANK}_s{seed}"
    root = CACHE / key
    if (root / "DONE").exists():
        return root
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    names = ["base"] + [f"expert_{k}" for k in range(experts)]
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for name, shape in tensor_shapes(layers).items():
        if len(shape) == 1:
            base = (1.0 + 0.1 * torch.randn(shape, generator=gen)) if "norm" in name else BASE_STD * torch.randn(shape, generator=gen)
        else:
            base = torch.randn(shape, generator=gen).mul_(BASE_STD)
        tensors["base"][name] = base.to(torch.bfloat16)
        for k in range(experts):
            if len(shape) == 1:
                delta = torch.randn(shape, generator=gen).mul_(NOISE_STD * 5)
            else:
                out, inp = shape
                a = torch.randn(out, RANK, generator=gen)
                b = torch.randn(RANK, inp, generator=gen)
                delta = (a @ b).mul_(LOWRANK_STD / math.sqrt(RANK))
                delta.add_(torch.randn(shape, generator=gen), alpha=NOISE_STD)
            tensors[f"expert_{k}"][name] = (base + delta).to(torch.bfloat16)
            del delta
        del base
    cfg = Qwen2Config(num_hidden_layers=layers, **QWEN)
    cfg.architectures = ["Qwen2ForCausalLM"]
    try:
        cfg.dtype = "bfloat16"
    except Exception:  # older transformers
        cfg.torch_dtype = "bfloat16"
    for n in names:
        d = root / n
        d.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(d)
        save_file(tensors[n], str(d / "model.safetensors"), metadata={"format": "pt"})
        tensors[n].clear()
    (root / "DONE").write_text(f"built in {time.perf_counter() - t0:.1f} s\n")
    print(f"[build] {key}: {time.perf_counter() - t0:.1f} s", flush=True)
    return root


# --------------------------------------------------------------------------------------------- merges


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


def run_merge(label: str, cfg: dict, cuda: bool, log_dir: Path) -> dict:
    work = CACHE / "runs" / label
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


def gram_floor(layers: int, experts: int, device) -> dict:
    """Time of the float32 Gram product alone (cheaper space) for every linear weight, and Gram + Cholesky."""
    counts: dict[tuple[int, int], int] = {}
    for s in linear_shapes(layers):
        counts[s] = counts.get(s, 0) + 1
    rows, g_total, gc_total = [], 0.0, 0.0
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
        rows.append({"shape": [out, inp], "count": n, "space": "dual" if r < inp else "primal", "gram_size": size,
                     "gram_s": g, "cholesky_s": c})
        g_total += n * g
        gc_total += n * (g + c)
        del x, gram
    return {"rows": rows, "gram_total_s": g_total, "gram_plus_cholesky_total_s": gc_total}


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


# --------------------------------------------------------------------------------------------- main


def machine(device) -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(), "nproc_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "loadavg_start": os.getloadavg(), "mem_total_gib": None, "device": str(device), "gpu": None,
    }
    try:
        import mergekit  # noqa: F401
        from importlib.metadata import version

        info["mergekit"] = version("mergekit")
    except Exception:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, short microbenchmark, adam/lowrank 30 iterations")
    ap.add_argument("--layers", type=int, default=None, help="layers of the model for the fast methods (default 24)")
    ap.add_argument("--subset-layers", type=int, default=1, help="layers of the model adam/lowrank run on (default 1)")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--cuda", action="store_true", help="pass --cuda to mergekit-yaml; microbenchmark on GPU")
    ap.add_argument("--skip-merges", action="store_true")
    ap.add_argument("--skip-subset", action="store_true", help="skip adam/lowrank merges")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--methods", default="task_arithmetic,ties,closed_form,spectral")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    layers = args.layers or (2 if args.quick else 24)
    subset_iters = 30 if args.quick else S.ITERATIONS
    device = torch.device("cuda" if args.cuda else "cpu")
    if args.cuda and not torch.cuda.is_available():
        print("--cuda given but torch sees no CUDA device", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = CACHE / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    result = {"issue": 3, "date": _dt.datetime.now().isoformat(timespec="seconds"), "mode": "quick" if args.quick else "full",
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "machine": machine(device), "model": {"config": QWEN, "layers": layers, "experts": args.experts,
              "expert_delta": f"rank-{RANK} (entry std {LOWRANK_STD}) + dense noise (std {NOISE_STD}), bf16"},
              "merges": {}, "subset": None, "floor": None, "micro": None, "notes": []}
    if args.cuda:
        result["notes"].append("--cuda: mergekit-yaml ran with --cuda; microbenchmark and floor on the GPU")

    def save():
        result["total_benchmark_s"] = time.perf_counter() - t_start
        result["machine"]["loadavg_end"] = os.getloadavg()
        (out_dir / "speed.json").write_text(json.dumps(result, indent=2))
        (out_dir / "speed.md").write_text(render_md(result))

    if not args.skip_merges:
        root = build_models(layers, args.experts)
        merges = result["merges"]
        for m in args.methods.split(","):
            if m in ("task_arithmetic", "ties"):
                cfg = merge_config(m, root, args.experts)
            else:
                cfg = merge_config("wudi", root, args.experts, solver=m)
            merges[m] = run_merge(f"L{layers}_{m}", cfg, args.cuda, log_dir)
            save()
        ta = merges.get("task_arithmetic")
        if ta and ta["ok"]:
            for m, r in merges.items():
                r["wall_ratio_vs_task_arithmetic"] = r["wall_s"] / ta["wall_s"]
                r["rss_ratio_vs_task_arithmetic"] = r["peak_rss_mib"] / ta["peak_rss_mib"]
        save()

    print("[floor] Gram products ...", flush=True)
    result["floor"] = gram_floor(layers, args.experts, device)
    result["floor"]["layers"] = layers
    save()

    if not args.skip_merges and not args.skip_subset:
        sub = args.subset_layers
        root1 = build_models(sub, args.experts)
        srows = {}
        srows["task_arithmetic"] = run_merge(f"L{sub}_task_arithmetic", merge_config("task_arithmetic", root1, args.experts),
                                             args.cuda, log_dir)
        srows["closed_form"] = run_merge(f"L{sub}_closed_form", merge_config("wudi", root1, args.experts, solver="closed_form"),
                                         args.cuda, log_dir)
        for m in ("adam", "lowrank"):
            srows[m] = run_merge(f"L{sub}_{m}", merge_config("wudi", root1, args.experts, solver=m, iterations=subset_iters),
                                 args.cuda, log_dir)
            save()
        ta1 = srows["task_arithmetic"]["wall_s"]
        ta_full = result["merges"].get("task_arithmetic", {}).get("wall_s")
        for m, r in srows.items():
            r["wall_ratio_vs_task_arithmetic"] = r["wall_s"] / ta1
            r["rss_ratio_vs_task_arithmetic"] = r["peak_rss_mib"] / srows["task_arithmetic"]["peak_rss_mib"]
            r["per_layer_s"] = (r["wall_s"] - ta1) / sub
            if ta_full and m != "task_arithmetic":
                # EXTRAPOLATION: the full model's task_arithmetic time plus this solver's per-layer extra time.
                r["extrapolated_full_model_s"] = ta_full + layers * r["per_layer_s"]
                r["extrapolated_ratio_vs_task_arithmetic"] = r["extrapolated_full_model_s"] / ta_full
        result["subset"] = {"layers": sub, "iterations": subset_iters, "rows": srows,
                            "note": f"adam/lowrank measured on a {sub}-layer model built the same way; the full "
                                    f"{layers}-layer figure is an EXTRAPOLATION: t_TA(full) + {layers} x "
                                    f"(t(solver) - t_TA) on the {sub}-layer model."}
        save()

    if not args.skip_micro:
        if args.quick:
            spec = [(1024, 1024, 3, 10), (4864, 896, 3, 3), (896, 4864, 3, 5)]
        else:
            spec = [(1024, 1024, 3, 300), (1024, 1024, 8, 20), (4864, 896, 3, 10), (896, 4864, 3, 20),
                    (896, 4864, 8, 10)]
        result["micro"] = {"rows": microbench(spec, device), "layer_macs_per_iteration": layer_flops_ratio(args.experts)}
        save()
    save()
    print(render_md(result))
    return 0


# --------------------------------------------------------------------------------------------- report


def _f(x, fmt="{:.1f}"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _merge_table(merges: dict) -> list:
    """Markdown rows of whole-model merges: wall, CPU, peak RSS and their ratios to task_arithmetic."""
    rows = ["| method | wall s | x task_arithmetic | CPU s (user+sys) | peak RSS MiB | x task_arithmetic |",
            "|---|---|---|---|---|---|"]
    for k, v in merges.items():
        name = k if k in ("task_arithmetic", "ties") else f"wudi `{k}`"
        rows.append(f"| {name} | {_f(v['wall_s'])} | {_f(v.get('wall_ratio_vs_task_arithmetic'), '{:.2f}')} | "
                    f"{_f(v.get('user_s', 0) + v.get('sys_s', 0))} | "
                    f"{_f(v['peak_rss_mib'], '{:.0f}')} | {_f(v.get('rss_ratio_vs_task_arithmetic'), '{:.2f}')} |"
                    + ("" if v.get("ok") else " FAILED"))
    return rows + [""]


def render_md(r: dict) -> str:
    m = r["machine"]
    lines = [f"### Speed benchmark ({r['mode']}, `{r['command']}`, {r['date']})", "",
             f"Machine: {m['cpu_model']}, {m['nproc']} CPU cores (shared with other jobs: load average "
             f"{m['loadavg_start'][0]:.1f} at start), {m.get('mem_total_gib')} GiB RAM, torch {m['torch']}"
             f" ({m['torch_threads']} threads), mergekit {m.get('mergekit', '?')}, device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else " (no GPU was available: no --cuda row)") + ".",
             "Absolute times are noisy on this shared machine; the ratios compare runs of the same invocation.", ""]
    if r["merges"]:
        md = r["model"]
        lines += [f"Whole-model `mergekit-yaml` merge: Qwen2.5-0.5B-shaped, {md['layers']} layers, {md['experts']} "
                  f"experts ({md['expert_delta']}), bf16 output.", "",
                  *_merge_table(r["merges"])]
    for extra in r.get("extra_runs", []):
        lines += [f"{extra['label']}", "", *_merge_table(extra["merges"])]
    if r.get("floor"):
        f = r["floor"]
        lines += [f"Floor ({f['layers']} layers' linear weights, float32, cheaper space): Gram products alone "
                  f"{f['gram_total_s']:.1f} s; Gram + Cholesky {f['gram_plus_cholesky_total_s']:.1f} s.", ""]
    if r.get("subset"):
        s = r["subset"]
        lines += [f"`adam` / `lowrank` ({s['iterations']} iterations) on a {s['layers']}-layer model "
                  f"(same construction). {s['note']}", "",
                  "| method | wall s | x task_arithmetic | per layer s | full model s (EXTRAPOLATED) | x TA (extrap.) | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in s["rows"].items():
            name = k if k == "task_arithmetic" else f"wudi `{k}`"
            lines.append(f"| {name} | {_f(v['wall_s'])} | {_f(v.get('wall_ratio_vs_task_arithmetic'), '{:.2f}')} | "
                         f"{_f(v.get('per_layer_s')) if k != 'task_arithmetic' else '-'} | "
                         f"{_f(v.get('extrapolated_full_model_s'), '{:.0f}')} | "
                         f"{_f(v.get('extrapolated_ratio_vs_task_arithmetic'), '{:.1f}')} | {_f(v['peak_rss_mib'], '{:.0f}')} |")
        lines.append("")
    if r.get("micro"):
        mi = r["micro"]
        lines += ["Per-weight microbenchmark (float32; naive = the authors' autograd loop, tests/reference_wudi.py; "
                  "adam/naive timed over the same number of iterations; rel diff = max|adam - naive| / max|naive|, "
                  "and relative to the largest update max|naive - init|):", "",
                  "| weight [out, in] | experts | iterations | naive s | adam s | adam speed-up | adam space | max rel diff | rel diff of update | closed_form s | spectral s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in mi["rows"]:
            lines.append(f"| {row['shape'][0]}x{row['shape'][1]} | {row['experts']} | {row['iterations']} | "
                         f"{row['naive_s']:.2f} | {row['adam_s']:.2f} | {row['adam_speedup_vs_naive']:.1f}x | "
                         f"{row['adam_space']} | {row['adam_max_rel_diff']:.1e} | {row['adam_max_rel_diff_of_update']:.1e} | "
                         f"{row['closed_form_s']:.3f} | {row['spectral_s']:.3f} |")
        lm = mi["layer_macs_per_iteration"]
        lines += ["", f"Per Adam iteration, one whole Qwen2.5-0.5B-shaped layer (q,k,v,o,gate,up,down; 3 experts) "
                      f"costs {lm['naive_macs'] / 1e9:.0f} G multiply-adds in the naive loop vs {lm['adam_macs'] / 1e9:.0f} G "
                      f"in the C/D (or dual) form: {lm['ratio']:.1f}x fewer.", ""]
        if mi.get("layer_composite"):
            lc = mi["layer_composite"]
            lines += [f"Measured per-layer composite ({lc['how']}): naive {lc['naive_per_iter_s']:.2f} s vs adam "
                      f"{lc['adam_per_iter_s']:.2f} s per iteration: {lc['speedup']:.1f}x.", ""]
    if r.get("micro_note"):
        lines += [r["micro_note"], ""]
    if r.get("targets"):
        lines += ["Targets (issue 3):", ""] + [f"- {t}" for t in r["targets"]] + [""]
    for n in r.get("notes", []):
        lines.append(f"- {n}")
    lines.append(f"\nBenchmark total: {r.get('total_benchmark_s', 0) / 60:.1f} min.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
