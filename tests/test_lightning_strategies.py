"""Merge strategies of the callback: what mergekit is handed (whole groups, per-tensor values in
order), which tensors are linear weights, and how the work is split over ranks and chunks."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from mergekit.merge_methods.base import PerGroupValues
from torch import nn

from mergekit_wudi.io import load_state_dict, save_safetensors_atomic
from mergekit_wudi.lightning import WUDIMergeCallback, strategies
from mergekit_wudi.lightning.distributed import shard_names
from mergekit_wudi.lightning.strategies import byte_chunks, linear_flags
from test_lightning_callback import FAST_WUDI, TinyModel, assert_same, direct_merge, write_inputs

CLOSED_FORM = {"solver": "closed_form"}


class TokenModel(LightningModule):
    """An embedding, a plain Linear, a Linear tied to the embedding, and an untied LM head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 16, bias=False)
        self.decoder.weight = self.tokens.weight  # tied input/output embedding
        self.lm_head = nn.Linear(8, 16)

    def forward(self, ids):
        hidden = self.body(self.tokens(ids))
        return self.decoder(hidden) + self.lm_head(hidden)


def write_experts(tmp_path, model):
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_safetensors_atomic(base, tmp_path / "base.safetensors")
    paths = []
    for task in range(2):
        g = torch.Generator().manual_seed(task)
        expert = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(str(tmp_path / f"e{task}.safetensors"))
        save_safetensors_atomic(expert, paths[-1])
    return base, paths


def test_linear_flags_follow_module_types_ties_and_vocabulary_names():
    model = TokenModel()
    state = model.state_dict()
    names = list(state)
    flags = dict(zip(names, linear_flags(model, state, names)))
    assert flags == {"tokens.weight": False, "body.weight": True, "body.bias": False, "decoder.weight": False,
                     "lm_head.weight": False, "lm_head.bias": False}
    # Without a module, the documented name-and-shape rule decides: the LM head by its name.
    by_name = dict(zip(names, linear_flags(None, state, names)))
    assert by_name["lm_head.weight"] is False and by_name["body.weight"] is True


def test_embedding_and_tied_or_vocabulary_heads_are_not_wudi_merged(tmp_path):
    model = TokenModel()
    base, experts = write_experts(tmp_path, model)
    callback = WUDIMergeCallback(parameters=CLOSED_FORM, experts=experts, base=str(tmp_path / "base.safetensors"),
                                 output=str(tmp_path / "out"), progress=False)
    merged = callback.merge(None, model)
    for name in ("tokens.weight", "decoder.weight", "lm_head.weight", "lm_head.bias", "body.bias"):
        assert torch.equal(merged[name], base[name]), name  # non_linear="base"
    assert not torch.equal(merged["body.weight"], base["body.weight"])


def test_explicit_linear_flags_win(tmp_path):
    model = TokenModel()
    base, experts = write_experts(tmp_path, model)
    names = list(load_state_dict(tmp_path / "base.safetensors"))  # the merged tensors, in the base file's order
    linear = PerGroupValues([n in ("tokens.weight", "body.weight") for n in names])
    callback = WUDIMergeCallback(parameters={**CLOSED_FORM, "linear": linear}, experts=experts,
                                 base=str(tmp_path / "base.safetensors"), output=str(tmp_path / "out"), progress=False)
    merged = callback.merge(None, model)
    assert not torch.equal(merged["tokens.weight"], base["tokens.weight"])  # the user said linear
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])


class Spy:
    """Records every merge_state_dicts call (tensor names and the per-tensor linear flags)."""

    def __init__(self, monkeypatch):
        import mergekit.merge_methods

        self.calls = []
        self.real = mergekit.merge_methods.merge_state_dicts
        monkeypatch.setattr(mergekit.merge_methods, "merge_state_dicts", self)

    def __call__(self, models, method, **kwargs):
        names = list(next(iter(models.values())))
        linear = kwargs["parameters"].get("linear")
        self.calls.append((names, linear.values if linear is not None else None))
        return self.real(models, method, **kwargs)


def test_one_merge_state_dicts_call_for_the_whole_share_with_flags_in_tensor_order(tmp_path, monkeypatch):
    base, experts = write_inputs(tmp_path)
    spy = Spy(monkeypatch)
    model = TinyModel()
    callback = WUDIMergeCallback(parameters=FAST_WUDI, experts=experts, base=base, output=str(tmp_path / "o"),
                                 progress=False)
    merged = callback.merge(None, model)
    names = list(load_state_dict(base))
    assert len(spy.calls) == 1
    assert spy.calls[0] == (names, tuple(n in ("body.0.weight", "body.3.weight", "head.weight") for n in names))
    assert_same(merged, direct_merge("wudi", FAST_WUDI, base, experts, model))


def test_chunked_share_gives_the_same_merge(tmp_path, monkeypatch):
    base, experts = write_inputs(tmp_path)
    whole = WUDIMergeCallback(parameters=FAST_WUDI, experts=experts, base=base, output=str(tmp_path / "a"),
                              progress=False).merge(None, TinyModel())
    spy = Spy(monkeypatch)
    monkeypatch.setattr(strategies, "CHUNK_BYTES", 3 * 8 * 8 * 4)  # one 8x8 weight of base + 2 experts
    chunked = WUDIMergeCallback(parameters=FAST_WUDI, experts=experts, base=base, output=str(tmp_path / "b"),
                                progress=False).merge(None, TinyModel())
    assert len(spy.calls) > 2
    assert [n for names, _ in spy.calls for n in names] == list(whole)
    assert_same(chunked, whole)


def test_user_per_group_values_are_matched_to_their_tensors(tmp_path):
    base, experts = write_inputs(tmp_path)
    model = TinyModel()
    names = list(load_state_dict(base))  # the merged tensors, in the base file's order
    linear = PerGroupValues([n == "body.3.weight" for n in names])
    merged = WUDIMergeCallback(parameters={**CLOSED_FORM, "linear": linear}, experts=experts, base=base,
                               output=str(tmp_path / "o"), progress=False).merge(None, model)
    reference = direct_merge("wudi", CLOSED_FORM, base, experts, model)
    assert torch.equal(merged["body.3.weight"], reference["body.3.weight"])
    assert torch.equal(merged["body.0.weight"], load_state_dict(base)["body.0.weight"])  # not linear: kept
    with pytest.raises(ValueError, match=r"PerGroupValues needs 8 values"):
        WUDIMergeCallback(parameters={"linear": PerGroupValues([True])}, experts=experts, base=base,
                          output=str(tmp_path / "p"), progress=False).merge(None, model)


def test_non_floating_buffers_are_taken_from_the_base(tmp_path):
    class Normed(LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(4, 4)
            self.norm = nn.BatchNorm1d(4)

    model = Normed()
    base, experts = write_experts(tmp_path, model)
    for step, path in enumerate(experts):  # experts trained for different numbers of steps
        state = load_state_dict(path)
        state["norm.num_batches_tracked"] = torch.tensor(10 + step)
        save_safetensors_atomic(state, path)
    merged = WUDIMergeCallback(parameters=CLOSED_FORM, experts=experts, base=str(tmp_path / "base.safetensors"),
                               output=str(tmp_path / "o"), progress=False).merge(None, model)
    assert torch.equal(merged["norm.num_batches_tracked"], base["norm.num_batches_tracked"])


def test_shards_balance_elements_and_chunks_respect_the_budget():
    shares = shard_names(["a", "b", "c", "d"], [100, 60, 50, 10], 2)
    assert shares == [["a", "d"], ["b", "c"]]  # greedy, largest first: loads 110 and 110
    assert shard_names(["a", "b"], [1, 1], 1) == [["a", "b"]]
    assert byte_chunks(["a", "b", "c", "d"], [4, 4, 9, 1], 8) == [["a", "b"], ["c"], ["d"]]
