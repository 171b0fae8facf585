"""WUDIMergeCallback's bad-input matrix: every case, its error, and when it is caught.

| case                                         | error                                   | caught            |
|----------------------------------------------|-----------------------------------------|-------------------|
| num_tasks 0 / -1 / 1.5 / True                | MergeInputError "positive integer"      | construction      |
| unknown parameter name (``iteratons``)        | MergeConfigError, suggests the name     | setup (no step)   |
| bad value (``solver: sgd``, ``lr: .inf``)     | MergeConfigError naming the parameter   | setup (no step)   |
| unknown method / MuDSC parameter              | ValueError naming it                    | setup (no step)   |
| include / exclude pattern matching nothing    | MergeInputError naming the pattern      | setup (no step); on_fit_start for configure_model modules |
| explicit experts without base                 | MergeInputError                         | setup (no step)   |
| expert NaN / wrong shape / missing / untrained| MergeInputError naming expert + tensor  | merge, before any write |
| non-finite merged tensor                      | MergeResultError naming tensor + params | merge, before any write or load |
| interrupted merge                             | the interrupt                           | nothing written   |
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from mergekit_wudi.io import load_state_dict, save_safetensors_atomic
from mergekit_wudi.lightning import MergeInputError, MergeResultError, RegistryMerge, WUDIMergeCallback
from mergekit_wudi.validation import MergeConfigError
from test_lightning_callback import FAST_WUDI, TinyModel, make_trainer, task_loader, write_inputs


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize("num_tasks", [0, -1, 1.5, True])
def test_num_tasks_must_be_a_positive_integer(num_tasks):
    with pytest.raises(MergeInputError, match=rf"num_tasks must be a positive integer .*got {num_tasks!r}"):
        WUDIMergeCallback(num_tasks=num_tasks)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"parameters": {"iteratons": 20}}, MergeConfigError,
         r"WUDIMergeCallback\(parameters=...\): unknown parameter 'iteratons'.*did you mean 'iterations'"),
        ({"parameters": {"solver": "sgd"}}, MergeConfigError, r"parameter 'solver'.*sgd"),
        ({"parameters": {"learning_rate": float("inf")}}, MergeConfigError, r"'learning_rate' must be a finite"),
        ({"method": "task_arithmetic", "parameters": {"weight": [1.0, float("nan")]}}, MergeConfigError,
         r"weight\[1\].*finite"),
        ({"method": "nope"}, ValueError, r"unknown merge method 'nope'"),
        ({"method": "mudsc", "parameters": {"mdoe": "align"}}, ValueError, r"unknown parameter 'mdoe'; did you mean 'mode'"),
        ({"include": ["bdy"]}, MergeInputError, r"include pattern 'bdy' matches no tensor of the module"),
        ({"exclude": ["haed*"]}, MergeInputError, r"exclude pattern 'haed\*' matches no tensor of the module"),
        ({"exclude": ["body", "head"]}, MergeInputError, r"leave no tensor of the module to merge"),
        ({"method": "task_arithmetic", "parameters": {"weight": [1.0, 0.5, 0.2]}}, MergeInputError,
         r"parameter 'weight' has 3 values, but there are 2 inputs \(task_0, task_1\)"),
        ({"method": "task_arithmetic", "parameters": {"weight": {"task_0": 1.0, "tsak_1": 0.5}}}, MergeInputError,
         r"parameter 'weight': key 'tsak_1' is not an expert of this merge \(they are task_0, task_1.*did you mean 'task_1'"),
        ({"method": "task_arithmetic", "parameters": {"weight": {"task_0": 1.0}}}, MergeInputError,
         r"parameter 'weight': no value for task_1"),
        ({"method": "mudsc", "parameters": {"weights": [1.0, 1.0, 1.0]}}, ValueError,
         r"weights must hold one non-negative weight per model \(2\)"),
        ({"method": "mudsc", "parameters": {"mode": "zip"}, "exclude": ["head"]}, MergeInputError,
         r"mode='zip' cannot keep per-task tensors out of the merge \(include/exclude leave out \['head.weight'"),
    ],
)
def test_bad_arguments_fail_in_setup_before_the_first_step(tmp_path, kwargs, error, message):
    counter = CountSteps()
    callback = WUDIMergeCallback(num_tasks=2, output=str(tmp_path / "merge"), **kwargs)
    with pytest.raises(error, match=message):
        make_trainer(tmp_path, [callback, counter]).fit(TinyModel(), task_loader(0))
    assert counter.steps == 0
    assert not (tmp_path / "merge").exists()


def test_explicit_experts_without_base_fail_in_setup(tmp_path):
    _, experts = write_inputs(tmp_path)
    counter = CountSteps()
    with pytest.raises(MergeInputError, match="without base="):
        make_trainer(tmp_path, [WUDIMergeCallback(experts=experts), counter]).fit(TinyModel(), task_loader(0))
    assert counter.steps == 0


def test_direct_merge_checks_base_method_and_parameters(tmp_path):
    _, experts = write_inputs(tmp_path)
    callback = WUDIMergeCallback(experts=experts, base=str(tmp_path / "nope.ckpt"), output=str(tmp_path / "o"))
    with pytest.raises(MergeInputError, match="base file not found: .*nope.ckpt"):
        callback.merge(None, TinyModel())
    with pytest.raises(ValueError, match="unknown merge method 'nope'"):
        WUDIMergeCallback(method="nope", experts=experts, base=experts[0]).merge()
    with pytest.raises(MergeConfigError, match="unknown parameter 'iters'.*did you mean 'iterations'"):
        WUDIMergeCallback(parameters={"iters": 3}, experts=experts, base=experts[0]).merge()
    with pytest.raises(MergeInputError, match="include pattern 'nope' matches no tensor of the base"):
        WUDIMergeCallback(include=["nope"], experts=experts, base=experts[0]).merge()
    assert not (tmp_path / "o").exists()


def _nan(state, base):
    state["body.3.weight"][0, 0] = float("nan")
    return state


def _bad_shape(state, base):
    state["body.3.weight"] = torch.zeros(8, 9)
    return state


def _missing(state, base):
    del state["body.3.bias"]
    return state


def _equal_to_base(state, base):
    return dict(base)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_nan, r"'body.3.weight' of expert task_1 .*non-finite"),
        (_bad_shape, r"'body.3.weight' of expert task_1 .*shape \(8, 9\)"),
        (_missing, r"expert task_1 .*lacks .*body.3.bias"),
        (_equal_to_base, r"expert task_1 .*identical to the base"),
    ],
)
def test_bad_input_raises_naming_expert_and_tensor_and_writes_nothing(tmp_path, edit, message):
    base, experts = write_inputs(tmp_path, edit)
    out = tmp_path / "out"
    callback = WUDIMergeCallback(parameters=FAST_WUDI, experts=experts, base=base, output=str(out))
    with pytest.raises(MergeInputError, match=message):
        callback.merge(None, TinyModel())
    assert not out.exists()


class InfiniteMerge(RegistryMerge):
    """A strategy whose method 'returns' Inf in one tensor (a broken custom method or solver)."""

    def merge(self, *args):
        merged, heads = super().merge(*args)
        merged["body.3.weight"] = torch.full_like(merged["body.3.weight"], float("inf"))
        return merged, heads


class InfiniteCallback(WUDIMergeCallback):
    def build_strategy(self):
        return InfiniteMerge(name=self.method, parameters=self.parameters)


def test_non_finite_result_is_an_error_naming_tensor_and_parameters_and_nothing_is_loaded(tmp_path):
    base, experts = write_inputs(tmp_path)
    out = tmp_path / "out"
    model = TinyModel(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = InfiniteCallback(parameters={"solver": "closed_form"}, experts=experts, base=base, output=str(out))
    with pytest.raises(MergeResultError, match=r"'body.3.weight' has non-finite .*'wudi'.*'solver': 'closed_form'"):
        callback.merge(None, model)
    assert not out.exists()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert callback.merged_path is None


def test_non_finite_solver_output_through_the_registry_stops_the_merge(tmp_path, monkeypatch):
    from mergekit_wudi.solvers import wudi as wudi_solvers

    base, experts = write_inputs(tmp_path)
    monkeypatch.setattr(wudi_solvers, "merge_task_vectors", lambda base, *a, **k: torch.full_like(base, float("nan")))
    out = tmp_path / "out"
    model = TinyModel(seed=3)
    callback = WUDIMergeCallback(parameters={"solver": "closed_form"}, experts=experts, base=base, output=str(out))
    with pytest.raises((MergeResultError, ValueError), match=r"non-finite.*body.0.weight|body.0.weight.*non-finite"):
        callback.merge(None, model)
    assert not out.exists()
    assert bool(torch.isfinite(model.body[0].weight).all())


def test_interrupted_merge_leaves_no_output(tmp_path, monkeypatch):
    import mergekit.merge_methods

    base, experts = write_inputs(tmp_path)
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mergekit.merge_methods, "merge_state_dicts", interrupted)
    callback = WUDIMergeCallback(parameters=FAST_WUDI, experts=experts, base=base, output=str(out))
    with pytest.raises(KeyboardInterrupt):
        callback.merge(None, TinyModel())
    assert not out.exists()


def test_mudsc_without_module_is_a_clear_error(tmp_path, monkeypatch):
    _, experts = write_inputs(tmp_path)
    monkeypatch.setitem(sys.modules, "mergekit_wudi.mudsc", None)
    callback = WUDIMergeCallback(method="mudsc", experts=experts, dataloader=task_loader(0))
    with pytest.raises(ImportError, match="method='mudsc' needs mergekit_wudi.mudsc.mudsc_merge"):
        callback.merge(None, TinyModel())


class LateModel(TinyModel):
    """Builds its head in configure_model: patterns naming it can only be checked in on_fit_start."""

    def __init__(self):
        super().__init__()
        del self.head

    def configure_model(self):
        if not hasattr(self, "head"):
            self.head = nn.Linear(8, 2)


@pytest.mark.parametrize("exclude, fails", [(["head"], False), (["haed"], True)])
def test_patterns_of_a_configure_model_module_are_checked_before_the_first_step(tmp_path, exclude, fails):
    counter = CountSteps()
    callback = WUDIMergeCallback(parameters=FAST_WUDI, exclude=exclude, num_tasks=1, output=str(tmp_path / "m"))
    trainer = make_trainer(tmp_path, [callback, counter])
    if fails:
        with pytest.raises(MergeInputError, match="exclude pattern 'haed' matches no tensor of the module"):
            trainer.fit(LateModel(), task_loader(0))
        assert counter.steps == 0
    else:
        trainer.fit(LateModel(), task_loader(0))
        assert counter.steps == 2 and set(callback.task_heads[0]) == {"head.weight", "head.bias"}


def test_a_mistyped_expert_key_without_num_tasks_fails_in_setup(tmp_path):
    counter = CountSteps()
    callback = WUDIMergeCallback(method="task_arithmetic", parameters={"weight": {"task_0": 1.0, "task-1": 1.0}},
                                 output=str(tmp_path / "merge"))
    with pytest.raises(MergeInputError, match=r"key 'task-1' is not an expert .*task_0, task_1, \.\.\."):
        make_trainer(tmp_path, [callback, counter]).fit(TinyModel(), task_loader(0))
    assert counter.steps == 0


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_ckpt(path):
    garbage = path.with_suffix(".ckpt")
    garbage.write_bytes(b"not a checkpoint" * 8)
    return garbage


def _lacks_a_tensor(path):
    state = load_state_dict(path)
    del state["body.3.bias"]
    save_safetensors_atomic(state, path)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (_truncated, r"expert file .*e1.safetensors: cannot be read as weights .*SafetensorError"),
        (_garbage_ckpt, r"expert file .*e1.ckpt: cannot be read as weights .*UnpicklingError"),
        (_lacks_a_tensor, r"expert task_1 \(.*e1.safetensors\) lacks 1 parameter\(s\) .*body.3.bias"),
    ],
)
def test_explicit_expert_files_are_read_in_setup_and_named(tmp_path, spoil, message):
    base, experts = write_inputs(tmp_path)
    experts[1] = str(spoil(Path(experts[1])) or experts[1])
    counter = CountSteps()
    callback = WUDIMergeCallback(parameters=FAST_WUDI, experts=experts, base=base, output=str(tmp_path / "out"))
    with pytest.raises(MergeInputError, match=message):
        make_trainer(tmp_path, [callback, counter]).fit(TinyModel(), task_loader(0))
    assert counter.steps == 0


def test_a_truncated_base_file_is_named_in_setup(tmp_path):
    base, experts = write_inputs(tmp_path)
    _truncated(Path(base))
    counter = CountSteps()
    callback = WUDIMergeCallback(parameters=FAST_WUDI, base=base, num_tasks=2, output=str(tmp_path / "out"))
    with pytest.raises(MergeInputError, match=r"base file .*base.safetensors: cannot be read as weights"):
        make_trainer(tmp_path, [callback, counter]).fit(TinyModel(), task_loader(0))
    assert counter.steps == 0


def test_experts_as_one_path_is_one_expert_and_other_types_are_refused(tmp_path):
    base, experts = write_inputs(tmp_path)
    one = WUDIMergeCallback(method="task_arithmetic", parameters={"weight": 1.0}, experts=Path(experts[0]), base=base,
                            output=str(tmp_path / "out"))
    assert one.experts == [experts[0]]
    merged = one.merge(None, TinyModel())
    expected = load_state_dict(experts[0])  # task arithmetic of one expert with weight 1 is that expert
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
    with pytest.raises(MergeInputError, match=r"experts\[1\] must be a path .*got 3"):
        WUDIMergeCallback(experts=[experts[0], 3])
    with pytest.raises(MergeInputError, match="experts must be a list of paths .*got int"):
        WUDIMergeCallback(experts=3)


def test_an_lwptv_mask_keyed_by_other_ids_fails_in_setup(tmp_path):
    from mergekit_wudi.lwptv_masks import write_mask_file

    names = list(TinyModel().state_dict())
    mask = tmp_path / "mask.json"
    write_mask_file(mask, {"model_a": [], "model_b": names[:1]}, names, ratio=0.2)
    counter = CountSteps()
    callback = WUDIMergeCallback(
        method="preprocessed_task_arithmetic", num_tasks=2, output=str(tmp_path / "merge"),
        parameters={"preprocess": "lwptv", "lwptv_mask_file": str(mask)},
    )
    with pytest.raises(MergeInputError, match=r"lwptv_mask_file '.*mask.json' has no model 'task_0' "
                                              r"\(models there: model_a, model_b\)"):
        make_trainer(tmp_path, [callback, counter]).fit(TinyModel(), task_loader(0))
    assert counter.steps == 0


def test_an_input_file_where_the_callback_writes_is_refused_and_kept(tmp_path):
    """Merging last round's merged.safetensors with a new expert into the same output= overwrote it."""
    base, experts = write_inputs(tmp_path)
    first = WUDIMergeCallback(method="task_arithmetic", parameters={"weight": 1.0}, experts=experts, base=base,
                              output=str(tmp_path / "round1"))
    first.merge(None, TinyModel())
    merged = tmp_path / "round1" / "merged.safetensors"
    before = merged.read_bytes()
    again = WUDIMergeCallback(method="task_arithmetic", parameters={"weight": 1.0}, experts=[str(merged), experts[1]],
                              base=base, output=str(tmp_path / "round1"))
    with pytest.raises(MergeInputError, match=r"experts\[0\] '.*round1/merged.safetensors' lies where this callback "
                                              r"writes its results .*give another output="):
        again.merge(None, TinyModel())
    counter = CountSteps()
    with pytest.raises(MergeInputError, match=r"experts\[0\] .* lies where this callback writes"):
        make_trainer(tmp_path, [again, counter]).fit(TinyModel(), task_loader(0))
    assert counter.steps == 0 and merged.read_bytes() == before
    elsewhere = WUDIMergeCallback(method="task_arithmetic", parameters={"weight": 1.0},
                                  experts=[str(merged), experts[1]], base=base, output=str(tmp_path / "round2"))
    elsewhere.merge(None, TinyModel())  # another output= is fine
    assert merged.read_bytes() == before
