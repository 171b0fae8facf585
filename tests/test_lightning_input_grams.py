"""WUDIMergeCallback(input_grams=...) (issue 21, part 2): hooks collect exactly X^T X of each task's
last N batches, the Grams are saved with the expert (resume keeps them), the merge uses them
(the same kernel as mergekit_wudi.merge_with_input_grams), the memory plan is announced and refused
early, wide layers are sketched, PEFT LoRA layers are hooked on their base layer, padding is masked,
and the DDP reduction sums ranks."""

from __future__ import annotations

import logging
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mergekit_wudi
from mergekit_wudi.input_grams import load_grams
from mergekit_wudi.io import load_state_dict
from mergekit_wudi.lightning import InputGrams, MergeInputError, WUDIMergeCallback
from mergekit_wudi.lightning import input_grams as gram_mode
from mergekit_wudi.solvers.input_grams import GramSketch
from test_lightning_callback import TinyModel, make_trainer
from test_lightning_checks import CountSteps

LINEARS = ("body.0", "body.3")  # TinyModel's merged linears (head excluded)


def loader(task: int, batches: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(300 + task)
    x = torch.randn(4 * batches, 4, generator=g)
    return DataLoader(TensorDataset(x, torch.randn(4 * batches, 2, generator=g) + task), batch_size=4)


class RecordInputs(Callback):
    """Every linear's input, per training batch (what the Grams must be made of)."""

    def __init__(self, layers):
        self.layers, self.inputs, self.handles = layers, [], []
        self.training_batch = self.validated = False

    def on_train_start(self, trainer, pl_module):
        modules = dict(pl_module.named_modules())
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.layers]

    def _hook(self, name):
        def hook(module, args):
            if self.training_batch:
                self.inputs[-1].setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        return hook

    def on_train_batch_start(self, *args):
        self.inputs.append({})
        self.training_batch = True

    def on_train_batch_end(self, *args):
        self.training_batch = False

    def on_validation_batch_start(self, *args):
        self.validated = True

    def on_train_end(self, trainer, pl_module):
        for h in self.handles:
            h.remove()

    def gram(self, name, last):
        xs = [x for batch in self.inputs[-last:] for x in batch[name]]
        x = torch.cat(xs)
        return x.T @ x


class Validated(TinyModel):
    def validation_step(self, batch, batch_idx):
        self(batch[0])


def test_hooks_collect_exactly_the_gram_of_the_last_n_batches(tmp_path):
    """6 planned batches, last 2 hooked: the file holds X^T X of batches 4-5 only, per layer, in
    merge naming; a validation pass inside the window is not counted."""
    record = RecordInputs(LINEARS)
    callback = WUDIMergeCallback(exclude=["head"], num_tasks=2, output=str(tmp_path / "m"),
                                 input_grams=InputGrams(last_batches=2))
    trainer = make_trainer(tmp_path, [callback, record], max_steps=6, limit_val_batches=1, val_check_interval=5)
    val = DataLoader(TensorDataset(torch.full((4, 4), 100.0), torch.zeros(4, 2)), batch_size=4)
    trainer.fit(Validated(), loader(0, batches=6), val)
    assert record.validated  # a validation pass ran inside the window
    grams, metadata = load_grams(callback._store().gram_path(0))
    assert set(grams) == {f"{n}.weight" for n in LINEARS}
    assert metadata["batches"] == "2" and metadata["tokens"] == "8"
    for name in LINEARS:
        torch.testing.assert_close(grams[f"{name}.weight"], record.gram(name, 2), rtol=1e-6, atol=1e-5)
        assert not torch.allclose(grams[f"{name}.weight"], record.gram(name, 3))
    assert callback._gram_collector is None  # freed


def test_the_merge_uses_the_grams_and_equals_the_python_entry(tmp_path, caplog):
    callback = WUDIMergeCallback(exclude=["head"], num_tasks=2, output=str(tmp_path / "m"),
                                 parameters={"solver": "closed_form"}, input_grams={"last_batches": 2, "ridge": 1e-3})
    model = TinyModel()
    with caplog.at_level(logging.INFO):
        for task in range(2):
            make_trainer(tmp_path, [callback], max_steps=4).fit(model, loader(task))
    assert "input_grams on 2 linear layers over each task's last 2 batches: 320 B per task on device (float32), 640 B on disk for 2 tasks" in caplog.text
    merged = load_state_dict(callback.merged_path)
    base = load_state_dict(os.path.join(callback.output_dir, "base.safetensors"))
    base = {n: base[n] for n in merged}
    experts = [{n: t for n, t in load_state_dict(p).items() if n in merged} for p in callback.expert_paths]
    grams = [callback._store().gram_path(i) for i in range(2)]
    expected = mergekit_wudi.merge_with_input_grams(base, experts, grams, parameters={"solver": "closed_form"},
                                                    ridge=1e-3)
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6)
    # the linears are not what data-free WUDI gives; the LayerNorm follows the configured method (base)
    data_free = mergekit_wudi.merge_with_input_grams(base, experts, [{}, {}], parameters={"solver": "closed_form"})
    assert not torch.allclose(merged["body.0.weight"], data_free["body.0.weight"], atol=1e-4)
    torch.testing.assert_close(merged["body.1.weight"], base["body.1.weight"])


def test_resume_keeps_the_grams_of_finished_tasks(tmp_path):
    """A fresh callback restored from the first one's checkpoint state (what a resume does) merges
    with task 0's Grams from disk."""
    options = {"last_batches": 2}
    first = WUDIMergeCallback(exclude=["head"], num_tasks=2, output=str(tmp_path / "m"), input_grams=options)
    model = TinyModel()
    make_trainer(tmp_path, [first], max_steps=4).fit(model, loader(0))
    resumed = WUDIMergeCallback(exclude=["head"], num_tasks=2, output=str(tmp_path / "m"), input_grams=options)
    resumed.load_state_dict(first.state_dict())
    make_trainer(tmp_path, [resumed], max_steps=4).fit(model, loader(1))
    assert resumed.merged_path is not None
    straight = WUDIMergeCallback(exclude=["head"], num_tasks=2, output=str(tmp_path / "n"), input_grams=options)
    model = TinyModel()
    for task in range(2):
        make_trainer(tmp_path, [straight], max_steps=4).fit(model, loader(task))
    a, b = load_state_dict(resumed.merged_path), load_state_dict(straight.merged_path)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_an_expert_without_grams_is_an_error_naming_it(tmp_path):
    callback = WUDIMergeCallback(exclude=["head"], num_tasks=2, output=str(tmp_path / "m"), input_grams={"last_batches": 1})
    model = TinyModel()
    make_trainer(tmp_path, [callback], max_steps=2).fit(model, loader(0))
    os.remove(callback._store().gram_path(0))
    with pytest.raises(MergeInputError, match=r"expert task_0 .* has no input Grams .*task_0.safetensors is missing"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(model, loader(1))


class Wide(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.narrow, self.wide, self.head = nn.Linear(4, 64), nn.Linear(64, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.wide(torch.relu(self.narrow(x))))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_memory_above_the_budget_is_refused_in_setup_naming_the_largest_layers(tmp_path):
    steps = CountSteps()
    callback = WUDIMergeCallback(exclude=["head"], output=str(tmp_path / "m"),
                                 input_grams=InputGrams(last_batches=1, max_memory="10KB"))
    with pytest.raises(MergeInputError, match=r"need 16\.4 KB for 2 layers, above max_memory='10KB'; largest: "
                                              r"wide\.weight \(in=64: 16\.4 KB\), narrow\.weight \(in=4: 64 B\).*"
                                              r"sketch_rank=<k>"):
        make_trainer(tmp_path, [callback, steps], max_steps=2).fit(Wide(), loader(0))
    assert steps.steps == 0


def test_wide_layers_are_sketched_to_fit_the_budget(tmp_path, caplog):
    """64 x 64 exact (16.4 KB) does not fit 6 KB; rank 8: 64*9 + 64*8 floats. The narrow layer stays exact."""
    callback = WUDIMergeCallback(exclude=["head"], num_tasks=2, output=str(tmp_path / "m"),
                                 input_grams=InputGrams(last_batches=2, max_memory="6KB", sketch_rank=8))
    model = Wide()
    record = RecordInputs(("wide",))
    with caplog.at_level(logging.INFO):
        for task in range(2):
            make_trainer(tmp_path, [callback] + ([record] if task == 0 else []), max_steps=3).fit(
                model, loader(task, batches=3))
    assert "1 widest layers sketched at rank 8" in caplog.text
    grams, metadata = load_grams(callback._store().gram_path(0))
    assert isinstance(grams["wide.weight"], GramSketch) and grams["wide.weight"].factor.shape == (64, 8)
    assert grams["narrow.weight"].shape == (4, 4)
    assert metadata["sketched"] == '{"wide.weight": 8}'
    # 2 batches x 4 tokens: the 64-wide input has rank <= 8 = the sketch's rank, so the sketch is exact
    exact = record.gram("wide", 2)
    assert float((grams["wide.weight"].dense() - exact).norm() / exact.norm()) < 5e-3  # float32 sums, rank k = rank G
    assert callback.merged_path is not None
    with pytest.raises(MergeInputError, match="lower sketch_rank"):
        WUDIMergeCallback(input_grams=InputGrams(max_memory="1KB", sketch_rank=8))._plan_input_grams(Wide())


def test_an_unbounded_fit_is_refused_before_training(tmp_path):
    callback = WUDIMergeCallback(exclude=["head"], output=str(tmp_path / "m"), input_grams={"last_batches": 1})
    steps = CountSteps()
    with pytest.raises(MergeInputError, match="needs a fit of known length"):
        make_trainer(tmp_path, [callback, steps], max_steps=-1, max_epochs=-1).fit(TinyModel(), loader(0))
    assert steps.steps == 0


@pytest.mark.parametrize("options,match", [
    ({"last_batches": 0}, "last_batches must be an integer >= 1"),
    ({"max_memory": "lots"}, "max_memory must be a byte count"),
    ({"sketch_rank": 0}, "sketch_rank must be None or an integer >= 1"),
    ({"solver": "adam"}, "solver must be one of closed_form, spectral"),
    ({"shrink": 2}, "shrink must be in"),
    ({"last_batch": 3}, r"unknown option\(s\) \['last_batch'\]"),
])
def test_bad_options_are_errors_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        WUDIMergeCallback(input_grams=options)


def test_input_grams_refuse_explicit_mode_and_adapter_output():
    with pytest.raises(ValueError, match="needs sequential mode"):
        WUDIMergeCallback(experts=["a.safetensors"], input_grams={})
    with pytest.raises(ValueError, match="lora_output='adapter'"):
        WUDIMergeCallback(lora_output="adapter", input_grams={})


class Tokens(LightningModule):
    """A dict batch with padding: x [B, L, 4], attention_mask [B, L]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.gate, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x = batch["x"]
        return self.head(self.proj(x) * self.gate(x)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_padding_tokens_are_masked_and_a_shared_input_counts_for_each_layer(tmp_path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    x[mask == 0] = 1e3  # padding: huge values that must not reach the Gram
    data = [{"x": x, "attention_mask": mask}]
    callback = WUDIMergeCallback(exclude=["head"], output=str(tmp_path / "m"), input_grams={"last_batches": 1})
    make_trainer(tmp_path, [callback], max_steps=1).fit(Tokens(), DataLoader(data, batch_size=None))
    grams, metadata = load_grams(callback._store().gram_path(0))
    real = x[mask.bool()]
    torch.testing.assert_close(grams["proj.weight"], real.T @ real)
    torch.testing.assert_close(grams["gate.weight"], real.T @ real)  # same input: the Gram computed once, added twice
    assert metadata["tokens"] == "3"


def test_lora_layers_are_hooked_on_their_base_layer(tmp_path):
    pytest.importorskip("peft")
    from test_lightning_lora import lora_module, task_loader

    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "m"),
                                 parameters={"solver": "closed_form"}, input_grams={"last_batches": 2})
    model = lora_module()
    for task in range(2):
        make_trainer(tmp_path, [callback], max_steps=4).fit(model, task_loader(task))
    grams, _ = load_grams(callback._store().gram_path(1))
    assert set(grams) == {"net.fc1.weight", "net.fc2.weight"}  # base naming; no lora_A / lora_B / head
    x = torch.cat([b[0] for b in task_loader(1)][2:4])  # fc1's input is the batch: the last 2 of 4 batches
    torch.testing.assert_close(grams["net.fc1.weight"], x.T @ x, rtol=1e-6, atol=1e-5)
    assert callback.merged_path is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank, port, results):
    import types

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tensors = [torch.full((2, 2), float(rank + 1)), torch.tensor([10.0 * (rank + 1)])]
        gram_mode.all_reduce_sum_(tensors, types.SimpleNamespace(world_size=2))
        results[rank] = [t.tolist() for t in tensors]
    finally:
        torch.distributed.destroy_process_group()


def test_grams_are_summed_over_ranks():
    """The reduction the callback runs at fit end, in a real 2-process gloo group."""
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_reduce_worker, args=(_free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        assert results[rank] == [[[3.0, 3.0], [3.0, 3.0]], [30.0]]


class StopAfter(Callback):
    def __init__(self, batches):
        self.batches = batches

    def on_train_batch_end(self, trainer, *args):
        if trainer.fit_loop.epoch_loop.total_batch_idx + 1 >= self.batches:
            trainer.should_stop = True


def test_a_fit_stopped_before_its_gram_window_is_an_error_and_no_expert_is_saved(tmp_path):
    """Early stopping after 2 of 6 planned batches, window = the last 2: no Gram, no expert file."""
    callback = WUDIMergeCallback(exclude=["head"], output=str(tmp_path / "m"), input_grams={"last_batches": 2})
    with pytest.raises(MergeInputError, match=r"expert task_0's fit ended before its Gram window \(the last 2 "):
        make_trainer(tmp_path, [callback, StopAfter(2)], max_steps=6).fit(TinyModel(), loader(0, batches=6))
    assert callback.expert_paths == []
    assert not os.path.exists(callback._store().expert_path(0))


def test_a_crash_during_the_window_removes_the_hooks(tmp_path):
    class Crash(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.fit_loop.epoch_loop.total_batch_idx == 4:
                raise RuntimeError("boom")

    model = TinyModel()
    callback = WUDIMergeCallback(exclude=["head"], output=str(tmp_path / "m"), input_grams={"last_batches": 3})
    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(tmp_path, [callback, Crash()], max_steps=6).fit(model, loader(0, batches=6))
    assert callback._gram_collector is None
    assert all(not m._forward_pre_hooks for m in model.modules())
