"""WUDI's ``decorrelated`` solver and the callback's default for LoRA experts (issue 21): the cases an adversarial
round found broken in the first version (each test failed there): the merge leaves the span of the experts' LoRA
A rows when their rank is below TSV's per-task k, depends on the SVD basis, completes identical experts with
arbitrary directions; a NaN prior through the plain API; merge() called directly ignoring the LoRA default; a
per-expert list for a global parameter failing only after training."""
from __future__ import annotations

import pytest
import torch

from mergekit_wudi.solvers.subspace_merging import decorrelated_wudi_merged_task_vector


def _outside_row_span(tau_m: torch.Tensor, rows: torch.Tensor) -> float:
    q, _ = torch.linalg.qr(rows.T.double())
    t = tau_m.double()
    return float(torch.linalg.matrix_norm(t - t @ q @ q.T) / torch.linalg.matrix_norm(t))


def test_decorrelated_stays_in_the_span_of_the_lora_a_rows():
    """lora.EXACT_SOLVERS claims the decorrelated merge stays in the experts' A rows. With LoRA rank r below
    TSV's per-task k = min(out, in) // T (every real LoRA: r=8..64, k=hidden/T), each task's top-k SVD holds
    zero singular triplets whose singular vectors are an arbitrary null-space basis; the polar factor of the
    stacked V mixes them into the kept rows, so ~40% of tau_m lies in input directions no expert touched."""
    g = torch.Generator().manual_seed(0)
    out, inn, r, T = 64, 64, 4, 4  # k = 16 > r
    a = [torch.randn(r, inn, generator=g) for _ in range(T)]
    b = [torch.randn(out, r, generator=g) for _ in range(T)]
    tvs = torch.stack([bi @ ai for ai, bi in zip(a, b)])
    assert _outside_row_span(decorrelated_wudi_merged_task_vector(tvs), torch.cat(a)) < 1e-3


def test_default_lora_merge_with_adapter_output_is_exact_at_a_rank_below_k(tmp_path):
    """The default for a PEFT module (decorrelated) with lora_output='adapter' and LoRA r=2, below TSV's per-task
    k = min(out,in)//T (3 / 4 for fc1 / fc2): the merged update stays in the span of the A rows, so the exact
    adapter is written (the first version raised AdapterNotExactError after training)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from test_lightning_callback import make_trainer
    from test_lightning_lora import LORA_LAYERS, LoraTask, Net, task_loader

    from mergekit_wudi.lightning import WUDIMergeCallback

    model = LoraTask(get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=list(LORA_LAYERS),
                                                       modules_to_save=["head"])))
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "merge"),
                                 lora_output="adapter")
    for task in range(2):
        make_trainer(tmp_path, [callback], max_steps=4).fit(model, task_loader(task))
    assert callback.parameters == {"solver": "decorrelated"}
    assert callback.adapter_paths  # an exact adapter was written


def _lora_task_vectors(dtype=torch.float64, out=64, inn=64, r=4, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(out, r, generator=g, dtype=dtype) @ torch.randn(r, inn, generator=g, dtype=dtype)
                        for _ in range(T)])


def test_decorrelated_is_rotation_equivariant_and_dtype_stable():
    """A merge of weights must commute with a change of input basis (closed_form / TSV on full-rank tasks do, to
    1e-14). For tasks of rank < k, the arbitrary null-space singular vectors LAPACK returns enter the result:
    rotating the inputs changes it by ~80%, and float32 vs float64 of the same task vectors differ by ~80%."""
    tvs = _lora_task_vectors()
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    merged = decorrelated_wudi_merged_task_vector(tvs)
    torch.testing.assert_close(decorrelated_wudi_merged_task_vector(tvs @ q), merged @ q, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(decorrelated_wudi_merged_task_vector(tvs.float()).double(), merged, rtol=1e-3, atol=1e-4)


def test_identical_experts_merge_to_a_multiple_of_their_task_vector():
    """T identical rank-2 experts: the stacked singular vectors are rank-deficient, the polar factor completes them
    arbitrarily, and the merge (which should be a multiple of tau, in its row and column space) is ~90% off."""
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(16, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 16, generator=g, dtype=torch.float64)
    merged = decorrelated_wudi_merged_task_vector(torch.stack([tau] * 3))
    coef = float((merged * tau).sum() / (tau * tau).sum())
    assert float(torch.linalg.matrix_norm(merged - coef * tau)) < 1e-6 * float(torch.linalg.matrix_norm(merged))


def test_plain_api_refuses_a_non_finite_prior():
    """The kernel refuses a non-finite prior, but the plain solver API (decorrelated_wudi_merged_task_vector,
    merge_task_vectors, wudi) only checks prior < 0: prior=nan or inf returns NaN weights silently."""
    from mergekit_wudi.solvers.wudi import wudi

    base = torch.randn(6, 5)
    for prior in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="prior"):
            wudi(base, [base + 1, base + torch.randn(6, 5)], solver="decorrelated", prior=prior)


def test_merge_called_directly_applies_the_lora_recommendation(tmp_path):
    """docs/lightning.md: parameters=None means decorrelated 'when the module is a PEFT LoRA model', and
    `merge.merge(trainer, model)` is a documented way to merge. The choice is made only in setup, so the same
    experts merged via merge(pl_module=<PEFT module>) (no fit) use closed_form, via trainer.fit decorrelated."""
    pytest.importorskip("peft")
    from test_lightning_callback import make_trainer
    from test_lightning_lora import lora_module, task_loader

    from mergekit_wudi.io import load_state_dict
    from mergekit_wudi.lightning import WUDIMergeCallback

    model = lora_module()
    seq = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "seq"),
                            lora_a_updates=False)  # explicit mode below cannot know the A updates
    for task in range(2):
        make_trainer(tmp_path, [seq], max_steps=3).fit(model, task_loader(task))
    assert seq.parameters == {"solver": "decorrelated"}
    direct = WUDIMergeCallback(exclude=["*head*"], experts=seq.expert_paths, base=str(tmp_path / "seq" / "base.safetensors"),
                               output=str(tmp_path / "direct"))
    merged = direct.merge(pl_module=lora_module())
    expected = load_state_dict(seq.merged_path)
    torch.testing.assert_close(merged["net.fc1.weight"], expected["net.fc1.weight"])


def test_a_per_expert_list_for_a_global_parameter_is_refused_before_training(tmp_path):
    """The callback documents per-expert values as a list in task order; 'prior' is global, yet
    parameters={'solver': 'decorrelated', 'prior': [0.1, 0.2]} passes setup, both tasks train, and the merge
    raises a bare pydantic ValidationError that names neither 'prior' nor the callback (same for ridge / flow_time:
    pre-existing, inherited by prior)."""
    from test_lightning_callback import TinyModel, make_trainer, task_loader
    from test_lightning_checks import CountSteps

    from mergekit_wudi.lightning import MergeInputError, WUDIMergeCallback
    from mergekit_wudi.validation import MergeConfigError

    steps = CountSteps()
    callback = WUDIMergeCallback(parameters={"solver": "decorrelated", "prior": [0.1, 0.2]}, num_tasks=2,
                                 output=str(tmp_path / "m"), exclude=["head"])
    with pytest.raises((MergeConfigError, MergeInputError, ValueError), match="prior") as error:
        for task in range(2):
            make_trainer(tmp_path, [callback, steps]).fit(TinyModel(), task_loader(task))
    assert steps.steps == 0, f"refused only after {steps.steps} training steps: {error.value}"



def test_overlapping_decorrelated_rows_keep_the_shrink_closed_form():
    """Where the kept right singular vectors are linearly dependent (sum_i k_i > in), the docstring's closed form
    is kept (a shrink of the decorrelated sum), no longer the prior objective's exact minimiser."""
    from mergekit_wudi.solvers.subspace_merging import _stacked_low_rank, polar_factor

    g = torch.Generator().manual_seed(4)
    tvs = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)  # k = 1 per task, 6 rows in a 4-dim input space
    u, s, vh = _stacked_low_rank(tvs, 1, nonzero_only=True)
    expected = (1 + 0.2) / (1 + 0.2 * 6) * (polar_factor(u, partial=True) * s) @ polar_factor(vh, partial=True)
    torch.testing.assert_close(decorrelated_wudi_merged_task_vector(tvs, prior=0.2), expected)


def test_low_rank_task_vectors_take_the_exact_sketch_and_match_the_full_svd(monkeypatch):
    """LoRA-rank task vectors of a wide layer get their nonzero triplets from a range sketch (O(out in 64)), used
    only when exact: the merge equals the one from full SVDs; a full-rank task vector falls back to the full SVD."""
    from mergekit_wudi.solvers import subspace_merging as sm

    g = torch.Generator().manual_seed(6)
    lora = torch.stack([torch.randn(600, 8, generator=g) @ torch.randn(8, 520, generator=g) for _ in range(3)])
    dense = torch.randn(3, 600, 520, generator=g)
    calls = []
    real = sm.randomized_svd
    monkeypatch.setattr(sm, "randomized_svd", lambda tau, q: calls.append(q) or real(tau, q))
    sketched, sketched_dense = (decorrelated_wudi_merged_task_vector(t) for t in (lora, dense))
    assert len(calls) == 6  # tried for every task vector, kept for the low-rank ones only
    monkeypatch.setattr(sm, "LOW_RANK_SKETCH", 10 ** 6)  # never sketch
    full = decorrelated_wudi_merged_task_vector(lora)
    assert float(torch.linalg.matrix_norm(sketched - full) / torch.linalg.matrix_norm(full)) < 1e-5
    torch.testing.assert_close(sketched_dense, decorrelated_wudi_merged_task_vector(dense))
