"""MuDSC (arXiv 2403.01753): bad inputs, non-finite values, compute dtype, BatchNorm reset.

The bad-input matrix of ``mudsc_merge`` at a glance: every case is refused with an error naming the
argument, model, tensor or layer, and (except for activations, which need a forward pass) before any
work starts: ``build_spec`` (the first step of the merge) is replaced by a tripwire.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mergekit_wudi.mudsc import check_parameters, mudsc_merge, reset_batchnorm
from mergekit_wudi.mudsc import merge as merge_mod
from mergekit_wudi.mudsc import states as states_mod
from tests.test_mudsc import _one_thread, data, make  # noqa: F401  (_one_thread: autouse fixture)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the merge gets as far as tracing the model."""

    def tripwire(*args, **kwargs):
        raise AssertionError("the merge started before the bad input was refused")

    monkeypatch.setattr(merge_mod, "build_spec", tripwire)


# case -> (keyword arguments of mudsc_merge, error type, message pattern)
BAD_ARGUMENTS = {
    "unknown mode": (dict(mode="nope"), ValueError, "mode must be one of"),
    "alpha above 1": (dict(alpha=2.0), ValueError, r"alpha must be in \[0, 1\]"),
    "alpha NaN": (dict(alpha=math.nan), ValueError, "alpha must be finite"),
    "alpha a string": (dict(alpha="half"), TypeError, "alpha must be a number"),
    "alpha and a differ": (dict(alpha=0.2, a=0.3), ValueError, "either alpha or a"),
    "sweeps 0": (dict(sweeps=0), ValueError, "sweeps must be a positive integer"),
    "sweeps not an int": (dict(sweeps=2.5), ValueError, "sweeps must be a positive integer"),
    "tol negative": (dict(tol=-1e-3), ValueError, "tol must be >= 0"),
    "tol Inf": (dict(tol=math.inf), ValueError, "tol must be finite"),
    "max_batches 0": (dict(max_batches=0), ValueError, "max_batches must be a positive integer"),
    "bn_batches 0": (dict(bn_batches=0), ValueError, "bn_batches must be a positive integer"),
    "input_fn not callable": (dict(input_fn=3), TypeError, "input_fn must be callable"),
    "reset_bn not a bool": (dict(reset_bn="yes"), TypeError, "reset_bn must be True or False"),
    "return_info not a bool": (dict(return_info=1), TypeError, "return_info must be True or False"),
    "weights too short": (dict(weights=[1.0]), ValueError, r"weights must hold one non-negative weight per model \(2\)"),
    "weights negative": (dict(weights=[1.0, -1.0]), ValueError, "weights must hold one non-negative weight"),
    "weights all zero": (dict(weights=[0.0, 0.0]), ValueError, "not all zero"),
    "weights NaN": (dict(weights=[1.0, math.nan]), ValueError, "weights must be finite"),
    "weights Inf": (dict(weights=[math.inf, 1.0]), ValueError, "weights must be finite"),
    "weights a string": (dict(weights="11"), TypeError, "weights must be a sequence"),
    "module_weights too short": (dict(module_weights={"head_a": [1.0]}), ValueError,
                                 r"module_weights\['head_a'\] must hold one non-negative weight per model"),
    "module_weights NaN": (dict(module_weights={"head_a": [1.0, math.nan]}), ValueError,
                           r"module_weights\['head_a'\] must be finite"),
    "module_weights unknown module": (dict(module_weights={"head_c": [1.0, 0.0]}), ValueError,
                                      r"module_weights\['head_c'\] names no tensor of the model"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_is_refused_before_any_work(case, no_work):
    kwargs, error, pattern = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=pattern):
        mudsc_merge([make("mlp", 0), make("mlp", 1)], data("mlp"), **kwargs)


def test_bad_models_and_data_are_refused_before_any_work(no_work):
    a = make("mlp", 0)
    with pytest.raises(ValueError, match="need at least two models"):
        mudsc_merge([a], data("mlp"))
    with pytest.raises(TypeError, match="model 1 is a str, not a torch.nn.Module"):
        mudsc_merge([a, "model.pt"], data("mlp"))
    with pytest.raises(TypeError, match="dataloader must be an iterable of batches, got int"):
        mudsc_merge([a, make("mlp", 1)], 5)
    with pytest.raises(ValueError, match="the dataloader yielded no batch"):
        mudsc_merge([a, make("mlp", 1)], [])


@pytest.mark.parametrize("models, batches, message", [
    (lambda: [make("mlp", 0), make("mlp", 1).double()], lambda: data("mlp"),
     r"tensor 'trunk.0.weight' of model 1 is torch.float64 on cpu, of model 0 torch.float32 on cpu: put the models in one dtype"),
    (lambda: [make("mlp", 0), make("mlp", 1)], lambda: [torch.randn(8, 7)],
     r"model 0 cannot run on the inputs of the first batch \(\(8, 7\) torch.float32\): RuntimeError: mat1 and mat2 shapes"),
    (lambda: [make("mlp", 0), make("mlp", 1)], lambda: [torch.randn(8, 6, dtype=torch.float64)],
     r"model 0 cannot run on the inputs of the first batch \(\(8, 6\) torch.float64\).*check the dataloader and input_fn"),
])
def test_mixed_dtypes_and_inputs_the_model_cannot_take_are_named_before_tracing(models, batches, message, no_work):
    with pytest.raises(ValueError, match=message):
        mudsc_merge(models(), batches())


def test_huge_weights_merge_by_their_ratio():
    models = [make("mlp", 0), make("mlp", 1)]
    expected = mudsc_merge(models, data("mlp")).state_dict()
    for kwargs in (dict(weights=[1e308, 1e308]), dict(module_weights={"head_a": [1e308, 1e308]})):
        merged = mudsc_merge(models, data("mlp"), **kwargs).state_dict()
        for name, tensor in expected.items():
            torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7, msg=f"{kwargs}: {name}")


def test_a_one_pass_iterator_gives_the_merge_of_its_batches():
    models = [make("mlp", 0), make("mlp", 1)]
    batches = data("mlp", n=4)
    expected = mudsc_merge(models, batches, max_batches=3).state_dict()
    for one_pass in (iter(batches), (b for b in batches)):
        merged = mudsc_merge(models, one_pass, max_batches=3).state_dict()
        for name, tensor in expected.items():
            assert torch.equal(merged[name], tensor), name


@pytest.mark.parametrize("model_index,tensor,value", [
    (1, "trunk.2.weight", math.nan), (0, "head_b.bias", math.inf), (1, "trunk.3.running_var", -math.inf),
])
def test_non_finite_model_tensor_names_model_and_tensor(model_index, tensor, value, no_work):
    models = [make("mlp", 0), make("mlp", 1)]
    models[model_index].state_dict()[tensor].view(-1)[1] = value  # state_dict tensors share storage
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN or Inf\) in model {model_index}, "
                                         rf"tensor '{tensor}'"):
        mudsc_merge(models, data("mlp"))


def _overflowing(seed: int) -> nn.Module:
    """Finite weights whose activations overflow float32: trunk.2's outputs are Inf, its BatchNorm NaN."""
    model = make("mlp", seed)
    with torch.no_grad():
        model.trunk[0].weight.mul_(1e20)
        model.trunk[2].weight.mul_(1e20)
    return model


@pytest.mark.parametrize("broken", [0, 1])
@pytest.mark.parametrize("mode", ["align", "zip"])
def test_non_finite_activations_name_model_and_layer(broken, mode):
    models = [make("mlp", 0), make("mlp", 1)]
    models[broken] = _overflowing(broken)
    assert all(torch.isfinite(t).all() for t in models[broken].state_dict().values())
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN or Inf\) in the activations of model {broken} "
                                         r"at layer 'trunk.4'"):
        mudsc_merge(models, data("mlp"), mode=mode, alpha=0.5)


def test_non_finite_result_of_the_batchnorm_reset_is_an_error_naming_the_tensor():
    # alpha=1: no activations are collected, the matching is finite; the BatchNorm reset then runs the
    # merged model, whose activations overflow: its running statistics would be NaN/Inf
    models = [_overflowing(0), _overflowing(1)]
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or Inf\) in the merged tensor "
                                         r"'trunk.3.running_mean'.*then the BatchNorm reset"):
        mudsc_merge(models, data("mlp"), alpha=1.0)
    merged = mudsc_merge(models, data("mlp"), alpha=1.0, reset_bn=False)  # the weights themselves are finite
    assert all(torch.isfinite(t).all() for t in merged.state_dict().values())


def test_non_finite_merged_tensor_is_refused_before_it_is_loaded(monkeypatch):
    def nan_average(U_g, w, m, dtype):
        return torch.full((U_g[m].shape[1], U_g[m].shape[0]), math.nan, dtype=dtype)

    def never(*args, **kwargs):
        raise AssertionError("a non-finite state dict was loaded into a module")

    monkeypatch.setattr(states_mod, "_averaging_matrix", nan_average)
    monkeypatch.setattr(merge_mod, "new_module", never)
    with pytest.raises(ValueError, match=r"merged tensor 'trunk.0.weight'.*mudsc_merge\(mode='align', alpha=0.5"):
        mudsc_merge([make("mlp", 0), make("mlp", 1)], data("mlp"))


def test_float64_models_are_computed_in_float64():
    a, b = make("mlp", 0).double(), make("mlp", 1).double()
    batches = [(x.double(), y) for x, y in data("mlp")]
    merged = mudsc_merge([a, b], batches, mode="average", reset_bn=False).state_dict()
    for name, t in a.state_dict().items():
        assert merged[name].dtype == t.dtype, name
        if torch.is_floating_point(t):  # exactly the float64 average: no float32 rounding on the way
            assert torch.equal(merged[name], 0.5 * t + 0.5 * b.state_dict()[name]), name
    rounded = (0.5 * a.trunk[0].weight.float() + 0.5 * b.trunk[0].weight.float()).double()
    assert not torch.equal(merged["trunk.0.weight"], rounded)  # the float32 result would differ


# ---------------------------------------------------------------- BatchNorm reset (torch's update_bn)
class _TwoInputs(nn.Module):
    """Dropout before a BatchNorm, two positional inputs, one submodule left in training mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x, shift):
        return self.bn(self.drop(self.fc(x)) + shift)


def test_reset_batchnorm_uses_eval_mode_inputs_max_batches_and_restores_modes():
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    model.drop.train()  # an unusual mode that must come back as it was
    batches = [{"x": torch.randn(16, 4), "shift": torch.randn(16, 6)} for _ in range(5)]
    input_fn = lambda batch: (batch["x"], batch["shift"])  # noqa: E731  (two positional inputs)
    momentum = model.bn.momentum
    reset_batchnorm(model, batches, input_fn=input_fn, max_batches=3)
    with torch.no_grad():  # BatchNorm inputs of the first 3 batches, dropout off
        seen = torch.cat([model.fc(b["x"]) + b["shift"] for b in batches[:3]])
    torch.testing.assert_close(model.bn.running_mean, seen.mean(0), rtol=1e-5, atol=1e-6)
    per_batch_var = torch.stack([s.var(0) for s in seen.split(16)])  # cumulative average of batch variances
    torch.testing.assert_close(model.bn.running_var, per_batch_var.mean(0), rtol=1e-5, atol=1e-6)
    assert model.bn.momentum == momentum
    assert int(model.bn.num_batches_tracked) == 3
    assert not model.training and not model.fc.training and not model.bn.training and model.drop.training
    with pytest.raises(ValueError, match="no batch for the BatchNorm reset"):
        reset_batchnorm(model, [], input_fn=input_fn)
    assert model.bn.momentum == momentum and model.drop.training


# ---------------------------------------------------------------- the same checks without models (callback setup)
@pytest.mark.parametrize("case", [c for c in BAD_ARGUMENTS if c != "module_weights unknown module"])
def test_check_parameters_refuses_what_the_merge_refuses(case):
    kwargs, error, pattern = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=pattern):
        check_parameters(kwargs, n_models=2)


def test_check_parameters_names_an_unknown_parameter_and_the_closest_one():
    with pytest.raises(ValueError, match="unknown parameter 'sweps'; did you mean 'sweeps'"):
        check_parameters({"sweps": 3})
    with pytest.raises(ValueError, match=r"unknown parameter 'colour' \(parameters: mode, alpha"):
        check_parameters({"colour": "red"})
    check_parameters({"mode": "zip", "alpha": 0.3, "sweeps": 2, "weights": [1, 2, 3]}, n_models=3)
    check_parameters({"weights": [1, 2, 3]})  # without n_models the length is left to the merge
