"""WUDIMergeCallback(lora_a_updates=...): the LoRA layers of a PEFT module merged with Eq. 1 whose input Gram of
task i is dA_i^T dA_i (the change of the layer's A over the task's fit), in sequential mode.

Resume mid-task (A_start read back from disk), output versioning, the plain merges when it is off,
include/exclude, an A that does not move, float64, LoRA layers it cannot handle. CPU, tiny models, a few steps.
(DDP is not available here: the multi-process paths are not covered.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mergekit_wudi.io import load_state_dict, save_safetensors_atomic
from mergekit_wudi.lightning import MergeInputError, WUDIMergeCallback
from test_lightning_callback import CrashAt, make_trainer

peft = pytest.importorskip("peft")
from mergekit.merge_methods.api import merge_tensors  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from mergekit_wudi import lora  # noqa: E402
from mergekit_wudi.input_grams import load_grams  # noqa: E402
from mergekit_wudi.solvers.input_grams import lora_update_gram, merge_with_grams  # noqa: E402
from test_lightning_lora import LORA_LAYERS, CaptureA, CaptureUpdates, Net, lora_module, task_loader  # noqa: E402

KEYS = [f"net.{n}.weight" for n in LORA_LAYERS]


def pretrained() -> dict:
    return {f"net.{k}": v.detach().clone() for k, v in Net().state_dict().items()}


def gram_file(out, task: int) -> Path:
    return Path(out, "grams", f"task_{task}.safetensors")


def a_start_file(out, task: int) -> Path:
    return Path(out, "grams", f"task_{task}.a_start.safetensors")


def assert_gram_is(saved, expected) -> None:
    torch.testing.assert_close(saved.factor, expected.factor, rtol=0, atol=0)
    torch.testing.assert_close(saved.diagonal, expected.diagonal, rtol=0, atol=0)


def files_under(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


class CrashOnTrainEnd(Callback):
    """Registered before the merge callback: the fit dies after its last step, before the expert is saved."""

    def on_train_end(self, trainer, pl_module):
        raise RuntimeError("crash at train end")


# ---------------------------------------------------------------------------------------------- 1. resume


@pytest.mark.parametrize("fresh", [True, False], ids=["new-process", "same-callback"])
def test_a_resumed_fit_takes_the_a_update_from_the_real_start_of_the_task(tmp_path, fresh):
    """Task 1 crashes after 3 steps (checkpoint at step 2, where A has already moved: at step 1 B is 0 so A does not);
    the resumed fit must read A_start of task 1 from grams/task_1.a_start.safetensors, not the restored A."""
    out, ckpt_dir = str(tmp_path / "merge"), tmp_path / "ckpt"
    base = pretrained()
    model, a, updates = lora_module(), CaptureA(), CaptureUpdates()
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=out)
    make_trainer(tmp_path, [callback, a, updates], max_steps=4).fit(model, task_loader(0))
    checkpointing = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, [callback, a, checkpointing, CrashAt(3)], max_steps=6,
                     enable_checkpointing=True).fit(model, task_loader(1))
    assert len(callback.expert_paths) == 1 and callback.merged_path is None
    assert a_start_file(out, 1).is_file() and not gram_file(out, 1).exists()
    real_start = a.start[1]
    on_disk = load_state_dict(a_start_file(out, 1))
    for key in KEYS:
        assert torch.equal(on_disk[key], real_start[key])

    if fresh:  # a new process: new module, new callback; the checkpoint brings their state back
        callback, model = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=out), lora_module()
    resumed_a, resumed_updates = CaptureA(), CaptureUpdates()
    checkpointing = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)
    make_trainer(tmp_path, [callback, resumed_a, resumed_updates, checkpointing], max_steps=6,
                 enable_checkpointing=True).fit(model, task_loader(1), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert callback.merged_path is not None and len(callback.expert_paths) == 2
    resume_point, end = resumed_a.start[0], resumed_a.end[0]
    saved = load_grams(gram_file(out, 1))
    assert saved[1]["source"] == "lora_a_updates"
    merged = load_state_dict(callback.merged_path)
    for key in KEYS:
        assert not torch.allclose(resume_point[key], real_start[key])  # the test would be blind otherwise
        expected = lora_update_gram(real_start[key], end[key])
        assert_gram_is(saved[0][key], expected)
        assert not torch.allclose(saved[0][key].factor, lora_update_gram(resume_point[key], end[key]).factor)
        grams = [lora_update_gram(a.start[0][key], a.end[0][key]), expected]
        experts = [base[key] + updates.updates[0][key], base[key] + resumed_updates.updates[0][key]]
        torch.testing.assert_close(merged[key], merge_with_grams(base[key], experts, grams), rtol=1e-5, atol=1e-6)
    # the a_start file of task 1 was not overwritten by the resumed fit
    assert all(torch.equal(load_state_dict(a_start_file(out, 1))[k], real_start[k]) for k in KEYS)


def test_a_resume_that_lost_its_a_start_file_says_so(tmp_path):
    """The a_start file gone (deleted, another disk): the fit goes on, its A update counts from the resumed step,
    and a warning names the file."""
    out, ckpt_dir = str(tmp_path / "merge"), tmp_path / "ckpt"
    model = lora_module()
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=out)
    make_trainer(tmp_path, [callback], max_steps=4).fit(model, task_loader(0))
    checkpointing = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, [callback, checkpointing, CrashAt(3)], max_steps=6,
                     enable_checkpointing=True).fit(model, task_loader(1))
    a_start_file(out, 1).unlink()
    with pytest.warns(UserWarning, match=r"without the LoRA A it started from .*task_1.a_start.safetensors"):
        make_trainer(tmp_path, [callback, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)], max_steps=6,
                     enable_checkpointing=True).fit(model, task_loader(1), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert callback.merged_path is not None and gram_file(out, 1).is_file()


def test_a_fit_resumed_after_its_last_step_saves_the_a_update_from_the_start_on_disk(tmp_path):
    """The crash comes after the last step, before the expert is saved: the resumed fit runs no step (no
    on_train_start), and the expert and its A-update Gram are saved at on_fit_end from the A start on disk."""
    out, ckpt_dir = str(tmp_path / "merge"), tmp_path / "ckpt"
    model, a = lora_module(), CaptureA()
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=1, output=out)
    checkpointing = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="crash at train end"):
        make_trainer(tmp_path, [CrashOnTrainEnd(), callback, a, checkpointing], max_steps=4,
                     enable_checkpointing=True).fit(model, task_loader(0))
    assert not gram_file(out, 0).exists() and callback.expert_paths == []
    resumed, model = WUDIMergeCallback(exclude=["*head*"], num_tasks=1, output=out), lora_module()
    make_trainer(tmp_path, [resumed], max_steps=4, enable_checkpointing=True).fit(
        model, task_loader(0), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert resumed.merged_path is not None
    end = {k: lora.lora_factors(model)[k].A for k in KEYS}  # not touched by the merge (only B is zeroed)
    saved = load_grams(gram_file(out, 0))[0]
    for key in KEYS:
        assert_gram_is(saved[key], lora_update_gram(a.start[0][key], end[key]))
        assert float(saved[key].factor.norm()) > 1e-4


# ---------------------------------------------------------------------------------------------- 2. versioning


def test_a_second_run_in_the_default_folder_versions_and_never_mixes_a_start_files(tmp_path):
    """A first run (base given by path) dies in task 0 after its A start was written: grams/task_0.a_start is its
    only file in <root>/merge. A second run must move on to merge-v1, use its own A start, and leave it alone."""
    base_path = tmp_path / "pretrained.safetensors"
    save_safetensors_atomic(pretrained(), base_path)
    first = WUDIMergeCallback(exclude=["*head*"], num_tasks=1, base=str(base_path))
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, [first, CrashAt(2)], max_steps=4).fit(lora_module(), task_loader(0))
    assert first.output_dir == str(tmp_path / "merge")
    kept = files_under(tmp_path / "merge")
    assert sorted(kept) == ["grams/task_0.a_start.safetensors"]

    second_model = lora_module()
    with torch.no_grad():  # another A init than the first run's, so a mix-up shows
        g = torch.Generator().manual_seed(7)
        for name, p in second_model.named_parameters():
            if "lora_A" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    a = CaptureA()
    second = WUDIMergeCallback(exclude=["*head*"], num_tasks=1)
    make_trainer(tmp_path, [second, a], max_steps=4).fit(second_model, task_loader(1))
    assert second.output_dir == str(tmp_path / "merge-v1") and Path(second.merged_path).is_file()
    assert files_under(tmp_path / "merge") == kept
    first_start = load_state_dict(tmp_path / "merge" / "grams" / "task_0.a_start.safetensors")
    own_start = load_state_dict(a_start_file(second.output_dir, 0))
    saved = load_grams(gram_file(second.output_dir, 0))[0]
    for key in KEYS:
        assert torch.equal(own_start[key], a.start[0][key]) and not torch.allclose(own_start[key], first_start[key])
        assert_gram_is(saved[key], lora_update_gram(a.start[0][key], a.end[0][key]))

    # a given output= holding only that A start is refused before any training step
    given = WUDIMergeCallback(exclude=["*head*"], num_tasks=1, output=str(tmp_path / "merge"))
    with pytest.raises(MergeInputError, match=r"already holds another run.s results \(grams/task_0.a_start"):
        make_trainer(tmp_path, [given], max_steps=2).fit(lora_module(), task_loader(2))
    assert files_under(tmp_path / "merge") == kept


# ---------------------------------------------------------------------------------------------- 3. off


def fit_two_tasks(tmp_path, **kwargs):
    model, updates, a = lora_module(), CaptureUpdates(), CaptureA()
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "merge"), **kwargs)
    for task in range(2):
        make_trainer(tmp_path, [callback, updates, a], max_steps=4).fit(model, task_loader(task))
    return callback, updates, a


@pytest.mark.parametrize("kwargs, parameters", [
    ({"lora_a_updates": False}, {"solver": "decorrelated"}),
    ({"parameters": {"solver": "closed_form"}}, {"solver": "closed_form"}),
    ({"parameters": {"solver": "decorrelated"}}, {"solver": "decorrelated"}),
], ids=["off", "explicit-closed-form", "explicit-decorrelated"])
def test_off_or_explicit_parameters_give_the_plain_wudi_merge(tmp_path, kwargs, parameters):
    base = pretrained()
    callback, updates, _ = fit_two_tasks(tmp_path, **kwargs)
    assert not callback._a_updates and callback.parameters == parameters
    assert not Path(callback.output_dir, "grams").exists()  # neither A starts nor Grams
    merged = load_state_dict(callback.merged_path)
    for key in KEYS:
        experts = [base[key] + u[key] for u in updates.updates]
        expected = merge_tensors([base[key]] + experts, "wudi", base_index=0, parameters={**parameters, "linear": True})
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
        bias = key[: -len("weight")] + "bias"
        assert torch.equal(merged[bias], base[bias])


def test_lora_a_updates_true_with_explicit_parameters_uses_them_for_the_other_tensors_only(tmp_path):
    base = pretrained()
    callback, updates, a = fit_two_tasks(tmp_path, parameters={"solver": "closed_form"}, lora_a_updates=True)
    assert callback._a_updates and callback.parameters == {"solver": "closed_form"}
    merged = load_state_dict(callback.merged_path)
    for key in KEYS:
        grams = [lora_update_gram(a.start[t][key], a.end[t][key]) for t in range(2)]
        experts = [base[key] + u[key] for u in updates.updates]
        torch.testing.assert_close(merged[key], merge_with_grams(base[key], experts, grams), rtol=1e-5, atol=1e-6)
        plain = merge_tensors([base[key]] + experts, "wudi", base_index=0,
                              parameters={"solver": "closed_form", "linear": True})
        assert not torch.allclose(merged[key], plain, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------- 4. edges


@pytest.mark.parametrize("kwargs", [{"exclude": ["*head*", "net.fc2"]}, {"include": ["net.fc1"]}],
                         ids=["exclude", "include"])
def test_a_lora_layer_kept_out_of_the_merge_gets_no_a_start_and_no_gram(tmp_path, kwargs):
    base = pretrained()
    model, updates, a = lora_module(), CaptureUpdates(), CaptureA()
    callback = WUDIMergeCallback(num_tasks=2, output=str(tmp_path / "merge"), **kwargs)
    for task in range(2):
        make_trainer(tmp_path, [callback, updates, a], max_steps=4).fit(model, task_loader(task))
    assert callback._a_updates
    merged = load_state_dict(callback.merged_path)
    assert "net.fc2.weight" not in merged and "net.fc1.weight" in merged
    for task in range(2):
        assert set(load_state_dict(a_start_file(callback.output_dir, task))) == {"net.fc1.weight"}
        assert set(load_grams(gram_file(callback.output_dir, task))[0]) == {"net.fc1.weight"}
        head = callback.task_heads[task]
        torch.testing.assert_close(head["net.fc2.weight"], base["net.fc2.weight"] + updates.updates[task]["net.fc2.weight"])
    key = "net.fc1.weight"
    grams = [lora_update_gram(a.start[t][key], a.end[t][key]) for t in range(2)]
    experts = [base[key] + u[key] for u in updates.updates]
    torch.testing.assert_close(merged[key], merge_with_grams(base[key], experts, grams), rtol=1e-5, atol=1e-6)


def freeze_lora_a(model, layers=LORA_LAYERS) -> None:
    for name, p in model.named_parameters():
        if "lora_A" in name and any(f".{layer}." in name for layer in layers):
            p.requires_grad_(False)


def fit_with_frozen_a(tmp_path, frozen):
    """Two tasks; ``frozen[task]``: the LoRA layers whose A that task does not train (only their B)."""
    model, updates, a = lora_module(), CaptureUpdates(), CaptureA()
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "merge"))
    for task in range(2):
        freeze_lora_a(model, frozen[task])
        make_trainer(tmp_path, [callback, updates, a], max_steps=4).fit(model, task_loader(task))
    return callback, updates, a


def test_an_a_that_does_not_move_gives_a_zero_gram_and_no_nan(tmp_path):
    """Task 1 trains fc1's B only (its A frozen): a zero Gram for fc1 of task 1 and a finite merge; fc2, whose A
    moved in both tasks, is the Gram merge."""
    base = pretrained()
    callback, updates, a = fit_with_frozen_a(tmp_path, [(), ("fc1",)])
    saved = load_grams(gram_file(callback.output_dir, 1))[0]
    assert float(saved["net.fc1.weight"].factor.abs().max()) == 0 and float(saved["net.fc1.weight"].diagonal.sum()) == 0
    assert float(saved["net.fc2.weight"].factor.norm()) > 1e-4
    assert float(updates.updates[1]["net.fc1.weight"].norm()) > 1e-3  # B moved: task 1 did train fc1
    merged = load_state_dict(callback.merged_path)
    assert all(torch.isfinite(t).all() for t in merged.values())
    key = "net.fc2.weight"
    grams = [lora_update_gram(a.start[t][key], a.end[t][key]) for t in range(2)]
    experts = [base[key] + u[key] for u in updates.updates]
    torch.testing.assert_close(merged[key], merge_with_grams(base[key], experts, grams), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", [[LORA_LAYERS, LORA_LAYERS], [(), ("fc1",)]], ids=["all-tasks", "one-task"])
def test_a_task_whose_a_did_not_move_still_counts_in_the_merge(tmp_path, frozen):
    base = pretrained()
    callback, updates, a = fit_with_frozen_a(tmp_path, frozen)
    merged = load_state_dict(callback.merged_path)
    for key in [k for k in KEYS if any(k.split(".")[1] in f for f in frozen)]:
        assert all(float(u[key].norm()) > 1e-3 for u in updates.updates)  # every expert did learn something
        moved = [t for t in range(2) if key.split(".")[1] not in frozen[t]]
        without = (merge_with_grams(base[key], [base[key] + updates.updates[t][key] for t in moved],
                                    [lora_update_gram(a.start[t][key], a.end[t][key]) for t in moved])
                   if moved else base[key])  # the merge of the tasks whose A moved only
        assert torch.isfinite(merged[key]).all()
        assert not torch.allclose(merged[key], without, rtol=1e-4, atol=1e-6), f"{key}: frozen-A tasks were dropped"
        inner = merge_tensors([base[key]] + [base[key] + u[key] for u in updates.updates], "wudi", base_index=0,
                              parameters={"solver": "decorrelated", "linear": True})
        torch.testing.assert_close(merged[key], inner, rtol=1e-5, atol=1e-6)  # such a layer: the inner method


def test_a_float64_module_keeps_float64_a_starts_grams_and_merge(tmp_path):
    base = {k: v.double() for k, v in pretrained().items()}
    model, updates, a = lora_module().double(), CaptureUpdates(), CaptureA()
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "merge"))
    for task in range(2):
        loader = task_loader(task)
        x, y = (t.double() for t in loader.dataset.tensors)
        make_trainer(tmp_path, [callback, updates, a], max_steps=4).fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    merged = load_state_dict(callback.merged_path)
    for task in range(2):
        assert all(t.dtype == torch.float64 for t in load_state_dict(a_start_file(callback.output_dir, task)).values())
        saved = load_grams(gram_file(callback.output_dir, task))[0]
        for key in KEYS:
            assert saved[key].factor.dtype == torch.float64
            assert_gram_is(saved[key], lora_update_gram(a.start[task][key], a.end[task][key]))
    for key in KEYS:
        assert merged[key].dtype == torch.float64
        grams = [lora_update_gram(a.start[t][key], a.end[t][key]) for t in range(2)]
        experts = [base[key] + u[key] for u in updates.updates]
        torch.testing.assert_close(merged[key], merge_with_grams(base[key], experts, grams), rtol=1e-10, atol=1e-12)


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc1, self.head = nn.Embedding(10, 6), nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.fc1(self.emb(x))))


class EmbeddingTask(LightningModule):
    def __init__(self):
        super().__init__()
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc1"], modules_to_save=["head"])
        self.net = get_peft_model(EmbeddingNet(), config)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def token_loader(task: int) -> DataLoader:
    g = torch.Generator().manual_seed(300 + task)
    return DataLoader(TensorDataset(torch.randint(0, 10, (16,), generator=g), torch.randn(16, 2, generator=g) + task),
                      batch_size=8)


def test_lora_on_an_embedding_still_merges_with_a_updates_off(tmp_path):
    """The same module merges with lora_a_updates=False (and with it on: the next test)."""
    model = EmbeddingTask()
    callback = WUDIMergeCallback(exclude=["*head*"], num_tasks=2, output=str(tmp_path / "merge"), lora_a_updates=False)
    for task in range(2):
        make_trainer(tmp_path, [callback], max_steps=3).fit(model, token_loader(task))
    assert {"net.emb.weight", "net.fc1.weight"} <= set(load_state_dict(callback.merged_path))


@pytest.mark.parametrize("exclude", [["*head*"], ["*head*", "net.emb"]], ids=["merged", "excluded"])
def test_the_default_handles_lora_on_an_embedding(tmp_path, exclude):
    model = EmbeddingTask()
    callback = WUDIMergeCallback(exclude=exclude, num_tasks=2, output=str(tmp_path / "merge"))
    for task in range(2):
        make_trainer(tmp_path, [callback], max_steps=3).fit(model, token_loader(task))
    assert callback._a_updates
    assert set(load_grams(gram_file(callback.output_dir, 0))[0]) == {"net.fc1.weight"}  # the embedding: inner method
    assert "net.fc1.weight" in load_state_dict(callback.merged_path)


DDP_LORA_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_lightning_callback import make_trainer
from test_lightning_lora import lora_module, task_loader
from mergekit_wudi.lightning import WUDIMergeCallback

out = sys.argv[1]
model = lora_module()
callback = WUDIMergeCallback(exclude=["*head*"], output=os.path.join(out, "merge"), num_tasks=2)
for task in range(2):
    trainer = make_trainer(out, [callback], devices=2, strategy="ddp", max_steps=4)
    trainer.fit(model, task_loader(task))
assert callback._a_updates
torch.save({{"state": {{k: v for k, v in model.state_dict().items() if "lora" not in k}},
            "experts": callback.expert_paths}}, os.path.join(out, f"rank{{trainer.global_rank}}.pt"))
"""


def test_ddp_ranks_record_the_same_a_updates_and_merge_identically(tmp_path):
    """Under DDP (2 CPU processes) each rank keeps its A start; rank 0 writes the Grams; both ranks end with the
    merge of the saved experts with the saved A-update Grams."""
    from test_lightning_callback import run_ddp_script

    run_ddp_script(tmp_path, DDP_LORA_SCRIPT)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, tensor in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], tensor, rtol=0, atol=0)
    merged = load_state_dict(tmp_path / "merge" / "merged.safetensors")
    base = load_state_dict(tmp_path / "merge" / "base.safetensors")
    experts = [load_state_dict(p) for p in ranks[0]["experts"]]
    grams = [load_grams(tmp_path / "merge" / "grams" / f"task_{t}.safetensors") for t in range(2)]
    assert all(meta["source"] == "lora_a_updates" for _, meta in grams)
    for name in (f"net.{n}.weight" for n in LORA_LAYERS):
        expected = merge_with_grams(base[name], [e[name] for e in experts], [g[name] for g, _ in grams])
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
