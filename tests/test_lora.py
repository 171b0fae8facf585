"""PEFT LoRA experts (issue #14, framework part): WUDI merges the updates ``s B A``, not the factors."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

import mergekit_wudi
from mergekit_wudi.lora_adapter import merged_adapter_factors, save_merged_adapter
from mergekit_wudi.lora import (
    AdapterNotExactError,
    UnsupportedLoraError,
    base_state_dict,
    effective_state_dict,
    is_peft_model,
    load_merged_into,
    lora_factors,
)

peft = pytest.importorskip("peft")
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

mergekit_wudi.register_methods()

HEADS = ("head.weight", "head.bias")


class Net(nn.Module):
    """fc1 is solved in the primal space ([48, 16]: T*out >= in), fc2 in the dual one ([8, 48])."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 48), nn.Linear(48, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Holder(nn.Module):
    """Stands in for a LightningModule holding the PEFT model as an attribute."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def randomize_adapter(model, seed, scale=0.3):
    """Trained-like adapter: nonzero ``lora_B`` (PEFT inits it to 0) and a changed head copy."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def make_expert(base_net, seed, *, r, alpha, rslora=False, scale=0.3, **config):
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["fc1", "fc2"], modules_to_save=["head"], **config
    )
    expert = get_peft_model(copy.deepcopy(base_net), lora)
    randomize_adapter(expert, seed, scale)
    return Holder(expert)


@pytest.fixture(scope="module")
def scenario():
    torch.manual_seed(0)
    base_net = Net()
    experts = [
        make_expert(base_net, 1, r=4, alpha=16),  # scaling alpha / r = 4
        make_expert(base_net, 2, r=2, alpha=3, rslora=True),  # rsLoRA: alpha / sqrt(r)
    ]
    scalings = [16 / 4, 3 / 2**0.5]
    return base_net, experts, scalings


def product_update(expert, layer, scaling):
    """``W0 + s B A`` computed from the PEFT parameters directly (independent of mergekit_wudi.lora)."""
    lora_layer = getattr(expert.net.base_model.model, layer)
    A, B = lora_layer.lora_A["default"].weight, lora_layer.lora_B["default"].weight
    return (lora_layer.base_layer.weight + scaling * (B @ A)).detach()


def merge(base, experts, solver, **parameters):
    models = {"base": base, **{f"task_{i}": e for i, e in enumerate(experts)}}
    return merge_state_dicts(models, "wudi", base="base", parameters={"solver": solver, **parameters})


def merge64(base, experts, solver):
    """The same merge in float64: the reference both output forms approximate."""
    return merge({k: v.double() for k, v in base.items()}, [{k: v.double() for k, v in e.items()} for e in experts], solver)


def check_outputs(adapter_out, full_out, exact_out):
    """The adapter agrees with the float32 full weights to their rounding (measured 2e-5: the closed
    form's ridge solve in float32) and with the float64 merge more closely (measured 2e-7)."""
    adapter_out, full_out = adapter_out.double(), full_out.double()
    assert float((adapter_out - full_out).norm() / exact_out.norm()) < 1e-4
    assert float((adapter_out - exact_out).norm() / exact_out.norm()) < 2e-6


def test_is_peft_model_and_cheap_import(scenario):
    base_net, experts, _ = scenario
    assert is_peft_model(experts[0]) and is_peft_model(experts[0].net)
    assert not is_peft_model(base_net)
    code = "import sys, mergekit_wudi.lora as m; assert 'peft' not in sys.modules, 'peft imported'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_names_and_base_follow_merge_and_unload(scenario):
    base_net, experts, scalings = scenario
    expert = experts[0]
    before = {k: v.clone() for k, v in expert.state_dict().items()}
    effective = effective_state_dict(expert)
    unloaded = copy.deepcopy(expert.net).merge_and_unload().state_dict()
    assert sorted(effective) == sorted(f"net.{k}" for k in unloaded)
    for name, tensor in unloaded.items():
        torch.testing.assert_close(effective[f"net.{name}"], tensor, rtol=0, atol=1e-6)
    torch.testing.assert_close(effective["net.fc1.weight"], product_update(expert, "fc1", scalings[0]))
    assert not torch.equal(effective["net.head.weight"], base_net.head.weight)  # the task's own head
    base = base_state_dict(expert)
    assert sorted(base) == sorted(effective)
    for name, tensor in base_net.state_dict().items():
        assert torch.equal(base[f"net.{name}"], tensor), name
    assert all(torch.equal(before[k], v) for k, v in expert.state_dict().items())  # module untouched
    factors = lora_factors(expert)
    assert sorted(factors) == ["net.fc1.weight", "net.fc2.weight"]
    assert factors["net.fc1.weight"].scaling == scalings[0] and factors["net.fc1.weight"].rank == 4
    assert lora_factors(experts[1])["net.fc2.weight"].scaling == pytest.approx(scalings[1], rel=1e-12)


def test_wudi_merges_the_updates_not_the_factors(scenario):
    base_net, experts, scalings = scenario
    base = base_state_dict(experts[0])
    merged = merge(base, [effective_state_dict(e) for e in experts], "closed_form")
    for layer in ("fc1", "fc2"):
        W0 = getattr(base_net, layer).weight.detach()
        products = [product_update(e, layer, s) for e, s in zip(experts, scalings)]
        expected = merge_tensors([W0, *products], "wudi", base_index=0, parameters={"solver": "closed_form"})
        torch.testing.assert_close(merged[f"net.{layer}.weight"], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(expected, W0)
    # What the callback did before (issue #14): merging lora_A and lora_B as if they were weights.
    fc = [e.net.base_model.model.fc2 for e in experts]
    same_rank = [make_expert(base_net, 3, r=2, alpha=3).net.base_model.model.fc2, fc[1]]
    A = merge_tensors([torch.zeros(2, 48)] + [l.lora_A["default"].weight.detach() for l in same_rank], "wudi", base_index=0)
    B = merge_tensors([torch.zeros(8, 2)] + [l.lora_B["default"].weight.detach() for l in same_rank], "wudi", base_index=0)
    truth = merge_tensors(
        [torch.zeros(8, 48)] + [(1.5 * l.lora_B["default"].weight @ l.lora_A["default"].weight).detach() for l in same_rank],
        "wudi", base_index=0,
    )
    assert float((1.5 * B @ A - truth).norm() / truth.norm()) > 0.1


@pytest.mark.parametrize("solver", ["closed_form", "spectral"])
def test_merged_adapter_round_trips_through_peft(scenario, solver, tmp_path):
    base_net, experts, _ = scenario
    base = base_state_dict(experts[0])
    effective = [effective_state_dict(e) for e in experts]
    merged = merge(base, effective, solver)
    factors = merged_adapter_factors(merged, base, [lora_factors(e) for e in experts], skip=[f"net.{h}" for h in HEADS])
    # the exact merge (float64): the factors match it closely, the float32 full weights to their rounding
    exact = merge64(base, effective, solver)
    for name, (A, B) in factors.items():
        assert A.shape[0] == 6 and B.shape[1] == 6  # rank = 4 + 2 (the stacked A rows are independent)
        tau = exact[name] - base[name].double()
        assert float((B.double() @ A.double() - tau).norm() / tau.norm()) < 1e-6
        assert float((base[name] + B @ A - merged[name]).norm() / tau.norm()) < 1e-4
    task0_head = {f"net.{h}": effective[0][f"net.{h}"] for h in HEADS}
    expert = experts[0]
    before = {k: v.clone() for k, v in expert.state_dict().items()}
    grads = {k: v.requires_grad for k, v in expert.named_parameters()}
    old_umask = os.umask(0o027)
    try:
        save_merged_adapter(tmp_path / "adapter", expert, factors, heads=task0_head)
    finally:
        os.umask(old_umask)
    # the expert is left as it was
    assert list(expert.net.peft_config) == ["default"] and expert.net.active_adapter == "default"
    assert sorted(before) == sorted(expert.state_dict())
    assert all(torch.equal(before[k], v) for k, v in expert.state_dict().items())
    assert grads == {k: v.requires_grad for k, v in expert.named_parameters()}
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert ((tmp_path / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging left behind
    # the adapter on the pretrained net == the full merged model with task 0's head (loadable without PEFT)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_net), str(tmp_path / "adapter")).eval()
    full, full64 = Net(), Net().double()
    full.load_state_dict({k[len("net."):]: v for k, v in {**merged, **task0_head}.items()})
    full64.load_state_dict({k[len("net."):]: v.double() for k, v in {**exact, **task0_head}.items()})
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        check_outputs(loaded(x), full(x), full64(x.double()))
        assert float((base_net(x) - full(x)).norm() / full(x).norm()) > 0.1


def test_load_merged_into_the_peft_module(scenario):
    base_net, experts, _ = scenario
    base = base_state_dict(experts[0])
    effective = [effective_state_dict(e) for e in experts]
    merged = merge(base, effective, "closed_form")
    merged.update({f"net.{h}": effective[1][f"net.{h}"] for h in HEADS})  # task 1's head
    expert = copy.deepcopy(experts[0])
    load_merged_into(expert, merged)
    full = Net()
    full.load_state_dict({k[len("net."):]: v for k, v in merged.items()})
    x = torch.randn(16, 16)
    with torch.no_grad():
        torch.testing.assert_close(expert(x), full(x), rtol=1e-5, atol=1e-6)
    assert float(expert.net.base_model.model.fc1.lora_B["default"].weight.detach().abs().max()) == 0
    assert torch.equal(expert.net.base_model.model.head.original_module.weight, base_net.head.weight)
    torch.testing.assert_close(effective_state_dict(expert)["net.fc1.weight"], merged["net.fc1.weight"])
    with pytest.raises(KeyError, match="not in the module"):
        load_merged_into(expert, {"net.nope.weight": torch.zeros(1)})


def test_adam_breaks_the_low_rank_structure(scenario):
    base_net, experts, _ = scenario
    skip = [f"net.{h}" for h in HEADS]
    base = base_state_dict(experts[0])
    merged = merge(base, [effective_state_dict(e) for e in experts], "closed_form")
    with pytest.raises(AdapterNotExactError, match="solver 'adam'.*full-weights"):
        merged_adapter_factors(merged, base, [lora_factors(e) for e in experts], skip=skip, solver="adam")
    assert merged_adapter_factors(merged, base, [lora_factors(e) for e in experts], skip=skip, solver="spectral")
    with pytest.raises(AdapterNotExactError, match="net.head.weight"):  # a head is not an adapter weight
        merged_adapter_factors(merged, base, [lora_factors(e) for e in experts])
    # Adam's per-coordinate steps leave the span of the A rows; with small updates the check sees it.
    small = [make_expert(base_net, seed, r=2, alpha=2, scale=0.003) for seed in (4, 5)]
    merged = merge(base, [effective_state_dict(e) for e in small], "adam")
    with pytest.raises(AdapterNotExactError, match="'net.fc[12].weight' is not in the span"):
        merged_adapter_factors(merged, base, [lora_factors(e) for e in small], skip=skip)


def test_fan_in_fan_out_conv1d_round_trip(tmp_path):
    """GPT-2 style ``transformers`` Conv1D layers store [in, out]; the adapter must still be exact."""
    from transformers.pytorch_utils import Conv1D

    class Gpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(24, 8), Conv1D(8, 24)  # Conv1D(nf=out, nx=in)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_fc(x)))

    torch.manual_seed(0)
    base_net = Gpt()
    experts = []
    for seed, r in ((1, 3), (2, 2)):
        config = LoraConfig(r=r, lora_alpha=5, target_modules=["c_fc", "c_proj"], fan_in_fan_out=True)
        expert = get_peft_model(copy.deepcopy(base_net), config)
        randomize_adapter(expert, seed)
        experts.append(expert)
    effective = [effective_state_dict(e) for e in experts]
    for e, state in zip(experts, effective):
        unloaded = copy.deepcopy(e).merge_and_unload().state_dict()
        assert all(torch.allclose(state[k], v, atol=1e-6) for k, v in unloaded.items())
    factors = lora_factors(experts[0])
    assert factors["c_fc.weight"].fan_in_fan_out and factors["c_fc.weight"].delta().shape == (8, 24)
    base = base_state_dict(experts[0])
    merged = merge(base, effective, "closed_form")
    merged_factors = merged_adapter_factors(merged, base, [lora_factors(e) for e in experts])
    save_merged_adapter(tmp_path / "a", experts[0], merged_factors)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base_net), str(tmp_path / "a"))
    full, full64 = Gpt(), Gpt().double()
    full.load_state_dict(merged)
    full64.load_state_dict(merge64(base, effective, "closed_form"))
    x = torch.randn(4, 8)
    with torch.no_grad():
        check_outputs(loaded(x), full(x), full64(x.double()))


def test_injected_lora_and_several_adapters_in_one_model(scenario, tmp_path):
    base_net, _, _ = scenario
    injected = peft.inject_adapter_in_model(LoraConfig(r=2, target_modules=["fc1"]), copy.deepcopy(base_net))
    randomize_adapter(injected, 7)
    assert is_peft_model(injected)
    effective = effective_state_dict(injected)
    assert sorted(effective) == sorted(base_net.state_dict())
    layer = injected.fc1
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(effective["fc1.weight"], (base_net.fc1.weight + delta).detach())
    with pytest.raises(UnsupportedLoraError, match="needs a module holding one peft.PeftModel"):
        save_merged_adapter(tmp_path / "x", injected, {})
    # one PeftModel holding one adapter per task: adapter_name picks the expert
    model = get_peft_model(copy.deepcopy(base_net), LoraConfig(r=2, target_modules=["fc1", "fc2"], modules_to_save=["head"]))
    model.add_adapter("task_1", LoraConfig(r=3, lora_alpha=5, target_modules=["fc2"], modules_to_save=["head"]))
    randomize_adapter(model, 8)
    reference = copy.deepcopy(model)
    reference.set_adapter("task_1")
    expected = reference.merge_and_unload().state_dict()
    effective = effective_state_dict(model, adapter_name="task_1")
    assert sorted(effective) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(effective[name], tensor, rtol=0, atol=1e-6)
    assert torch.equal(effective["fc1.weight"], base_net.fc1.weight)  # task_1 has no LoRA on fc1
    assert sorted(lora_factors(model, adapter_name="task_1")) == ["fc2.weight"]


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.conv, self.fc = nn.Embedding(10, 8), nn.Conv2d(2, 4, 3), nn.Linear(8, 8)


def test_embedding_and_conv_lora_full_weights_only():
    torch.manual_seed(0)
    expert = get_peft_model(Mixed(), LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv", "fc"]))
    randomize_adapter(expert, 1)
    effective = effective_state_dict(expert)
    unloaded = copy.deepcopy(expert).merge_and_unload().state_dict()
    assert sorted(effective) == sorted(unloaded)
    for name, tensor in unloaded.items():
        torch.testing.assert_close(effective[name], tensor, rtol=0, atol=1e-6)
    with pytest.raises(UnsupportedLoraError, match="'base_model.model.(emb|conv)'.*linear layers only"):
        lora_factors(expert)


@pytest.mark.parametrize(
    "case, match",
    [
        ("dora", r"'base_model.model.fc1'.*DoRA"),
        ("lora_bias", r"'base_model.model.fc1'.*lora_bias"),
        ("two_active", r"several active adapters \['default', 'other'\]"),
        ("merged", r"'base_model.model.fc1'.*merged into its base weight"),
        ("ia3", r"IA3.*only PEFT LoRA"),
    ],
)
def test_unsupported_variants_are_clear_errors(case, match):
    torch.manual_seed(0)
    if case == "ia3":
        expert = get_peft_model(Net(), peft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    else:
        options = {"dora": dict(use_dora=True), "lora_bias": dict(lora_bias=True)}.get(case, {})
        expert = get_peft_model(Net(), LoraConfig(r=2, target_modules=["fc1", "fc2"], **options))
    if case == "two_active":
        expert.add_adapter("other", LoraConfig(r=2, target_modules=["fc1", "fc2"]))
        expert.base_model.set_adapter(["default", "other"])
    if case == "merged":
        expert.merge_adapter()
    for function in (effective_state_dict, lora_factors):
        with pytest.raises(UnsupportedLoraError, match=match):
            function(expert)
    if case == "two_active":  # naming the adapter resolves it
        assert "fc1.weight" in lora_factors(expert, adapter_name="other")


def test_non_finite_update_names_the_layer():
    expert = get_peft_model(Net(), LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        expert.base_model.model.fc2.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*'base_model.model.fc2'"):
        effective_state_dict(expert)


# ---------------------------------------------------------------------------------------------
# mergekit YAML: `model: base+adapter` materialises W0 + s B A; wudi must merge those.


def test_yaml_base_plus_adapter_matches_effective_state_dicts(tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergekit_wudi.toy import mergekit_yaml_executable

    config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base_model = LlamaForCausalLM(config).float()
    base_model.save_pretrained(tmp_path / "base")
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    effective, models = [], []
    for index, (r, alpha, rslora) in enumerate(((4, 8, False), (2, 7, False), (3, 6, True))):
        lora = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets, task_type="CAUSAL_LM")
        expert = get_peft_model(copy.deepcopy(base_model), lora)
        randomize_adapter(expert, 10 + index, scale=0.05)
        expert.save_pretrained(tmp_path / f"adapter_{index}")
        effective.append(effective_state_dict(expert))
        models.append({"model": f"{tmp_path / 'base'}+{tmp_path / f'adapter_{index}'}"})
    merge_config = {
        "merge_method": "wudi", "base_model": str(tmp_path / "base"), "models": models,
        "parameters": {"solver": "closed_form"}, "dtype": "float32",
    }
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(merge_config))
    out = tmp_path / "merged"
    command = [
        mergekit_yaml_executable(), str(tmp_path / "merge.yml"), str(out), "--no-copy-tokenizer", "--quiet",
        "--lora-merge-cache", str(tmp_path / "lora_cache"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    merged = load_file(str(out / "model.safetensors"))
    expected = merge(base, effective, "closed_form")
    checked = 0
    for name, tensor in merged.items():
        if any(t in name for t in targets):
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
            assert not torch.equal(tensor, base[name])
            checked += 1
        else:
            assert torch.equal(tensor, base[name]), name
    assert checked == 2 * len(targets)
    # the low-rank fast path (issue 12): rank >= every adapter's rank reproduces the exact solver
    merge_config["parameters"]["rank"] = 4
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(merge_config))
    command[2] = str(tmp_path / "fast")
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    fast = load_file(str(tmp_path / "fast" / "model.safetensors"))
    reference = merge64(base, effective, "closed_form")
    for name in merged:
        if not any(t in name for t in targets):
            assert torch.equal(fast[name], base[name])
            continue
        moved = (reference[name] - base[name].double()).norm()
        dense_error = float((merged[name].double() - reference[name]).norm() / moved)
        fast_error = float((fast[name].double() - reference[name]).norm() / moved)
        # float32 rounding: the dense solver's own error against float64 is ~1e-5 here; the fast path's is smaller
        assert fast_error < max(2 * dense_error, 1e-5), (name, fast_error, dense_error)
