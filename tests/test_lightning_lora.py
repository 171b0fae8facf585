"""WUDIMergeCallback with PEFT LoRA experts (issue #14): the merge sees each task's effective update
``scaling * B_i A_i``, not the factors; the merged full model loads without PEFT; the merged adapter
loads with PEFT and agrees with it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from torch import nn

from mergekit_wudi.io import load_state_dict, save_safetensors_atomic
from mergekit_wudi.lightning import MergeInputError, WUDIMergeCallback
from test_lightning_callback import make_trainer
from test_lightning_checks import CountSteps

peft = pytest.importorskip("peft")
from mergekit.merge_methods.api import merge_tensors  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

CLOSED_FORM = {"solver": "closed_form"}
LORA_LAYERS = ("fc1", "fc2")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(6, 12), nn.Linear(12, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LoraTask(LightningModule):
    """The issue's scenario: a LightningModule holding a PEFT LoRA model with a modules_to_save head."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def lora_module(**config) -> LoraTask:
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_LAYERS), modules_to_save=["head"], **config)
    return LoraTask(get_peft_model(Net(), lora))


def task_loader(task: int):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(200 + task)
    x = torch.randn(32, 6, generator=g)
    y = torch.randn(32, 2, generator=g) + 2 * task
    return DataLoader(TensorDataset(x, y), batch_size=8)


class CaptureUpdates(Callback):
    """After each fit's training (before the merge): every LoRA layer's s*B@A and the trained head."""

    def __init__(self):
        self.updates, self.heads = [], []

    def on_train_end(self, trainer, pl_module):
        tuned = pl_module.net.base_model.model
        updates = {}
        for name in LORA_LAYERS:
            layer = getattr(tuned, name)
            B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            updates[f"net.{name}.weight"] = (layer.scaling["default"] * B @ A).detach().clone()
        self.updates.append(updates)
        head = tuned.head.modules_to_save["default"]
        self.heads.append({"net.head.weight": head.weight.detach().clone(), "net.head.bias": head.bias.detach().clone()})


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora")
    model = lora_module()
    pretrained = {k: v.detach().clone() for k, v in Net().state_dict().items()}
    capture = CaptureUpdates()
    callback = WUDIMergeCallback(method="wudi", parameters=CLOSED_FORM, exclude=["*head*"], num_tasks=2,
                                 output=str(tmp_path / "merge"), lora_output="adapter")
    for task in range(2):
        make_trainer(tmp_path, [callback, capture], max_steps=4).fit(model, task_loader(task))
    return model, pretrained, capture, callback


def test_the_merge_sees_the_updates_not_the_factors(scenario):
    model, pretrained, capture, callback = scenario
    merged = load_state_dict(callback.merged_path)
    assert set(merged) == {f"net.{n}" for n in pretrained if not n.startswith("head")}  # base naming, no factors
    for name in ("fc1", "fc2"):
        key, base = f"net.{name}.weight", pretrained[f"{name}.weight"]
        updates = [u[key] for u in capture.updates]
        assert all(float(u.norm()) > 1e-3 for u in updates)  # both tasks trained their adapters
        expected = merge_tensors([base] + [base + u for u in updates], "wudi", base_index=0,
                                 parameters={**CLOSED_FORM, "linear": True})
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(merged[key], base + sum(updates), rtol=1e-3, atol=1e-4)  # not a plain sum
        torch.testing.assert_close(merged[f"net.{name}.bias"], pretrained[f"{name}.bias"], rtol=0, atol=0)
    for task in range(2):  # each task's modules_to_save head kept per task
        for name, tensor in capture.heads[task].items():
            assert torch.equal(callback.task_heads[task][name], tensor), name


def test_full_output_loads_without_peft_and_agrees_with_the_module_and_the_adapters(scenario):
    model, pretrained, capture, callback = scenario
    merged = load_state_dict(callback.merged_path)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(9))
    assert len(callback.adapter_paths) == 2
    for task in range(2):
        plain = Net()
        plain.load_state_dict({k[len("net."):]: v for k, v in {**merged, **callback.task_heads[task]}.items()})
        callback.load_task_head(model, task)  # the PEFT module itself now computes the merged model
        adapted = PeftModel.from_pretrained(Net(), callback.adapter_paths[task]).eval()
        with torch.no_grad():
            reference = plain(x)
            torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(adapted(x), reference, rtol=1e-4, atol=1e-5)
        ranks = {adapted.base_model.model.fc1.lora_A["default"].weight.shape[0]}
        assert ranks <= set(range(1, 9))  # rank <= the sum of the experts' ranks (4 + 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lora_output": "adapter", "parameters": {}}, r"lora_output='adapter' with solver 'adam'"),
        ({"lora_output": "adapter", "parameters": {"solver": "lowrank"}}, r"solver 'lowrank'"),
        ({"lora_output": "both"}, r"lora_output must be one of"),
        ({"exclude": ["head.weight"]}, r"exclude pattern 'head.weight' matches no tensor of the module"),
        ({"lora_output": "adapter", "parameters": CLOSED_FORM},
         r"tensor\(s\) \['net.head.bias', 'net.head.weight'\] are trained .*not LoRA-wrapped.*exclude=\['net.head'\]"),
    ],
)
def test_lora_settings_fail_in_setup(tmp_path, kwargs, message):
    counter = CountSteps()
    callback = WUDIMergeCallback(num_tasks=2, output=str(tmp_path / "m"), **kwargs)
    with pytest.raises(MergeInputError, match=message):
        make_trainer(tmp_path, [callback, counter]).fit(lora_module(), task_loader(0))
    assert counter.steps == 0


def test_adapter_output_needs_a_peft_module_and_dora_is_refused(tmp_path):
    from test_lightning_callback import TinyModel

    plain = WUDIMergeCallback(parameters=CLOSED_FORM, lora_output="adapter", num_tasks=2, output=str(tmp_path / "a"))
    with pytest.raises(MergeInputError, match="needs a module with PEFT LoRA layers"):
        make_trainer(tmp_path, [plain]).fit(TinyModel(), task_loader(0))
    dora = WUDIMergeCallback(parameters=CLOSED_FORM, num_tasks=2, output=str(tmp_path / "b"))
    with pytest.raises(MergeInputError, match=r"'.*fc1'.*DoRA"):
        make_trainer(tmp_path, [dora]).fit(lora_module(use_dora=True), task_loader(0))


def test_explicit_experts_holding_lora_factors_are_refused(tmp_path):
    module = lora_module()
    base = {f"net.{k}": v for k, v in Net().state_dict().items()}
    save_safetensors_atomic(base, tmp_path / "base.safetensors")
    paths = []
    for task in range(2):
        state = {**copy.deepcopy(base), "net.fc1.lora_A.default.weight": torch.randn(4, 6)}
        state["net.fc1.weight"] = state["net.fc1.weight"] + 0.1
        paths.append(str(tmp_path / f"e{task}.safetensors"))
        save_safetensors_atomic(state, paths[-1])
    callback = WUDIMergeCallback(parameters=CLOSED_FORM, experts=paths, base=str(tmp_path / "base.safetensors"),
                                 output=str(tmp_path / "out"))
    with pytest.raises(MergeInputError, match=r"expert task_0 .*holds LoRA factors"):
        callback.merge(None, module)
    assert not (tmp_path / "out").exists()


def test_a_changed_tensor_an_adapter_cannot_carry_is_named_with_the_callbacks_remedy(tmp_path):
    """A tensor that changes without being trained (a BatchNorm statistic) is only seen after the merge."""
    from mergekit_wudi.io import save_safetensors_atomic as save
    from mergekit_wudi.lightning import lora_adapters

    expert = str(tmp_path / "task_0.safetensors")
    save({"net.fc1.weight.lora_A": torch.randn(2, 6), "net.fc1.weight.lora_B": torch.randn(12, 2)},
         lora_adapters.factors_path(expert), metadata={"lora_layers": '{"net.fc1.weight": [1.0, false]}'})
    base = {"net.fc1.weight": torch.zeros(12, 6), "net.bn.running_mean": torch.zeros(12)}
    merged = {"net.fc1.weight": torch.zeros(12, 6), "net.bn.running_mean": torch.ones(12)}
    with pytest.raises(MergeInputError, match=r"\['net.bn.running_mean'\] are changed by the merge .*exclude=\['net.bn'\]") as error:
        lora_adapters.adapter_factors(merged, base, [expert], [], "wudi", CLOSED_FORM)
    assert "skip=" not in str(error.value)


def test_the_default_parameters_merge_lora_experts_with_the_decorrelated_solver_and_an_exact_adapter(tmp_path):
    """Issue 21: parameters=None picks RECOMMENDED_WUDI for the experts' kind; LoRA -> solver 'decorrelated',
    whose merged update stays in the span of the experts' A rows, so the adapter output is exact."""
    from mergekit_wudi.lightning.callback import RECOMMENDED_WUDI

    model = lora_module()
    pretrained = {k: v.detach().clone() for k, v in Net().state_dict().items()}
    capture = CaptureUpdates()
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "merge"),
                                 lora_output="adapter")
    assert callback.parameters == RECOMMENDED_WUDI["full"]  # until setup sees the module
    for task in range(2):
        make_trainer(tmp_path, [callback, capture], max_steps=4).fit(model, task_loader(task))
    assert callback.parameters == RECOMMENDED_WUDI["lora"] == {"solver": "decorrelated"}
    merged = load_state_dict(callback.merged_path)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    for name in LORA_LAYERS:
        key, base = f"net.{name}.weight", pretrained[f"{name}.weight"]
        updates = [u[key] for u in capture.updates]
        expected = merge_tensors([base] + [base + u for u in updates], "wudi", base_index=0,
                                 parameters={"solver": "decorrelated", "linear": True})
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(merged[key], base + sum(updates), rtol=1e-3, atol=1e-4)  # shrunk, not summed
    plain = Net()
    plain.load_state_dict({k[len("net."):]: v for k, v in {**merged, **callback.task_heads[0]}.items()})
    adapted = PeftModel.from_pretrained(Net(), callback.adapter_paths[0]).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), plain(x), rtol=1e-4, atol=1e-5)


def test_the_default_parameters_of_a_full_fine_tune_are_readmes_first_yaml(tmp_path):
    """Not a PEFT module: spectral with rank auto (README's first YAML), and the merge is that merge."""
    from test_lightning_callback import TinyModel, direct_merge, assert_same
    from test_lightning_callback import task_loader as plain_loader

    callback = WUDIMergeCallback(num_tasks=2, output=str(tmp_path / "merge"), exclude=["head"])
    model = TinyModel()
    for task in range(2):
        make_trainer(tmp_path, [callback], max_steps=2).fit(model, plain_loader(task))
    assert callback.parameters == {"solver": "spectral", "rank": "auto"} and callback.merged_path is not None
    body = [n for n in model.state_dict() if not n.startswith("head")]
    expected = direct_merge("wudi", {"solver": "spectral", "rank": "auto"}, Path(tmp_path, "merge", "base.safetensors"),
                            callback.expert_paths, model, names=body)
    assert_same({n: load_state_dict(callback.merged_path)[n] for n in body}, expected)
    assert WUDIMergeCallback(parameters={}).parameters == {}  # {}: the authors' algorithm, as in a YAML


class CaptureA(Callback):
    """Each LoRA layer's A when a fit's training starts and ends (registered after the merge callback)."""

    def __init__(self):
        self.start, self.end = [], []

    def _a(self, pl_module):
        tuned = pl_module.net.base_model.model
        return {f"net.{n}.weight": getattr(tuned, n).lora_A["default"].weight.detach().clone() for n in LORA_LAYERS}

    def on_train_start(self, trainer, pl_module):
        self.start.append(self._a(pl_module))

    def on_train_end(self, trainer, pl_module):
        self.end.append(self._a(pl_module))


def test_in_sequential_mode_the_default_merges_lora_layers_with_their_a_updates(tmp_path):
    """Issue 21: the callback knows each adapter's A when its fit starts; the default merge of a PEFT module
    (lora_output='full') solves Eq. 1 with Grams dA_i^T dA_i (lora_update_gram) on the LoRA layers, and the
    other tensors with RECOMMENDED_WUDI['lora']. The A updates are saved next to each expert."""
    from mergekit_wudi.input_grams import load_grams
    from mergekit_wudi.solvers.input_grams import lora_update_gram, merge_with_grams

    model = lora_module()
    pretrained = {k: v.detach().clone() for k, v in Net().state_dict().items()}
    capture, a = CaptureUpdates(), CaptureA()
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "merge"))
    for task in range(2):
        # the second fit starts from the A the first one left (the callback resets only B)
        make_trainer(tmp_path, [callback, capture, a], max_steps=4).fit(model, task_loader(task))
    assert callback._a_updates and callback.parameters == {"solver": "decorrelated"}
    merged = load_state_dict(callback.merged_path)
    for name in LORA_LAYERS:
        key, base = f"net.{name}.weight", pretrained[f"{name}.weight"]
        torch.testing.assert_close(a.start[1][key], a.end[0][key])
        grams = [lora_update_gram(a.start[t][key], a.end[t][key]) for t in range(2)]
        assert all(float(g.factor.norm()) > 1e-4 for g in grams)  # A moved in both fits
        saved = [load_grams(Path(tmp_path, "merge", "grams", f"task_{t}.safetensors")) for t in range(2)]
        assert all(meta["source"] == "lora_a_updates" for _, meta in saved)
        for t in range(2):
            torch.testing.assert_close(saved[t][0][key].factor, grams[t].factor)
        updates = [u[key] for u in capture.updates]
        expected = merge_with_grams(base, [base + u for u in updates], grams)
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
        decorrelated = merge_tensors([base] + [base + u for u in updates], "wudi", base_index=0,
                                     parameters={"solver": "decorrelated", "linear": True})
        assert not torch.allclose(merged[key], decorrelated, rtol=1e-3, atol=1e-4)  # not the YAML default
        torch.testing.assert_close(merged[f"net.{name}.bias"], pretrained[f"{name}.bias"], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"lora_a_updates": True, "experts": ["a.safetensors", "b.safetensors"]}, "sequential mode"),
    ({"lora_a_updates": True, "input_grams": {}}, "input_grams"),
    ({"lora_a_updates": True, "lora_output": "adapter"}, "lora_output='adapter'"),
    ({"lora_a_updates": "yes"}, "None, True or False"),
])
def test_lora_a_updates_settings_that_cannot_work_are_refused_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        WUDIMergeCallback(**kwargs)


def test_the_a_update_merge_is_off_where_it_cannot_apply(tmp_path):
    """An adapter output keeps the exact decorrelated merge; explicit parameters keep plain WUDI; a module
    without LoRA layers refuses lora_a_updates=True in setup, before the first step."""
    for kwargs in ({"lora_output": "adapter"}, {"parameters": {"solver": "decorrelated"}},
                   {"lora_a_updates": False}):
        callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "m"), **kwargs)
        callback._resolve_recommended(lora_module())
        assert not callback._a_updates, kwargs
    from test_lightning_callback import TinyModel
    from test_lightning_callback import task_loader as plain_loader

    steps = CountSteps()
    callback = WUDIMergeCallback(num_tasks=2, output=str(tmp_path / "plain"), exclude=["head"], lora_a_updates=True)
    with pytest.raises(MergeInputError, match="lora_a_updates=True needs a module with PEFT LoRA layers"):
        make_trainer(tmp_path, [callback, steps], max_steps=2).fit(TinyModel(), plain_loader(0))
    assert steps.steps == 0
