"""WUDIMergeCallback across fits: a resume after a crash in (or just before) the merge still merges,
and a fit after the round is finished is refused before it trains (issue 20, items 9 and 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from mergekit_wudi.io import load_state_dict
from mergekit_wudi.lightning import MergeInputError, RegistryMerge, WUDIMergeCallback
from mergekit_wudi.lightning.storage import SnapshotStore
from test_lightning_callback import FAST_WUDI, TinyModel, assert_same, direct_merge, make_trainer, task_loader
from test_lightning_checks import CountSteps


def _checkpointing(tmp_path):
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)


def _killed(*args, **kwargs):
    raise SystemExit("killed")  # what a kill looks like to the code that was running


def _crash_in_second_fit(tmp_path, monkeypatch, target, name):
    """Task 0 fits; task 1 fits with last.ckpt saved every step and dies in ``target.name``."""
    out = str(tmp_path / "merge")
    model = TinyModel()
    callback = WUDIMergeCallback(parameters=FAST_WUDI, output=out, num_tasks=2)
    make_trainer(tmp_path, [callback]).fit(model, task_loader(0))
    with monkeypatch.context() as patch:
        patch.setattr(target, name, _killed)
        with pytest.raises(SystemExit):
            make_trainer(tmp_path, [callback, _checkpointing(tmp_path)], enable_checkpointing=True).fit(
                model, task_loader(1))
    assert callback.merged_path is None and not Path(out, "merged.safetensors").exists()
    return out


def _resume(tmp_path, out):
    """A fresh process: a new module and a new callback; last.ckpt brings the callback state back."""
    resumed = WUDIMergeCallback(parameters=FAST_WUDI, output=out, num_tasks=2)
    model = TinyModel(seed=1)
    trainer = make_trainer(tmp_path, [resumed, _checkpointing(tmp_path)], enable_checkpointing=True)
    trainer.fit(model, task_loader(1), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    return resumed, model


def _assert_merged(resumed, model, out):
    experts = [str(Path(out, "experts", f"task_{i}.safetensors")) for i in range(2)]
    assert resumed.expert_paths == experts
    assert resumed.merged_path == str(Path(out, "merged.safetensors"))
    expected = direct_merge("wudi", FAST_WUDI, Path(out, "base.safetensors"), experts, model)
    assert_same(load_state_dict(resumed.merged_path), expected)
    assert_same(model.state_dict(), expected)  # load_merged: not the checkpoint's (last expert's) weights


def test_resume_after_a_kill_in_the_merge_merges_the_expert_on_disk(tmp_path, monkeypatch):
    """The kill comes after task 1's expert was written; last.ckpt (saved at the last step) does not
    list it, and the resumed fit has no step left to train, so no hook saves it again."""
    out = _crash_in_second_fit(tmp_path, monkeypatch, RegistryMerge, "merge")
    expert = Path(out, "experts", "task_1.safetensors")
    written = load_state_dict(expert)
    resumed, model = _resume(tmp_path, out)
    _assert_merged(resumed, model, out)
    assert_same(load_state_dict(expert), written)  # the expert of the first run, not re-saved


def test_resume_after_a_kill_before_the_expert_was_written_saves_it_from_the_checkpoint(tmp_path, monkeypatch):
    """Killed while task 1's expert was being written: the resumed fit (no step left) saves the
    checkpoint's weights -- the end of task 1's training -- as that expert, then merges."""
    out = _crash_in_second_fit(tmp_path, monkeypatch, SnapshotStore, "save")
    expert = Path(out, "experts", "task_1.safetensors")
    assert not expert.exists()
    resumed, model = _resume(tmp_path, out)
    assert_same(load_state_dict(expert), load_state_dict(tmp_path / "ckpt" / "last.ckpt"))
    _assert_merged(resumed, model, out)


class KilledAfterTrainEnd(Callback):
    def on_train_end(self, trainer, pl_module):
        raise SystemExit("killed")


def test_resume_after_a_kill_after_the_expert_was_written_does_not_save_it_twice(tmp_path):
    """num_tasks=3: after the resumed second fit, two experts, the second one the first run's."""
    out = str(tmp_path / "merge")
    model = TinyModel()
    callback = WUDIMergeCallback(parameters=FAST_WUDI, output=out, num_tasks=3)
    make_trainer(tmp_path, [callback]).fit(model, task_loader(0))
    with pytest.raises(SystemExit):
        make_trainer(tmp_path, [callback, _checkpointing(tmp_path), KilledAfterTrainEnd()],
                     enable_checkpointing=True).fit(model, task_loader(1))
    written = load_state_dict(Path(out, "experts", "task_1.safetensors"))
    resumed = WUDIMergeCallback(parameters=FAST_WUDI, output=out, num_tasks=3)
    make_trainer(tmp_path, [resumed, _checkpointing(tmp_path)], enable_checkpointing=True).fit(
        TinyModel(seed=1), task_loader(1), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.expert_paths == [str(Path(out, "experts", f"task_{i}.safetensors")) for i in range(2)]
    assert not Path(out, "experts", "task_2.safetensors").exists() and resumed.merged_path is None
    assert_same(load_state_dict(resumed.expert_paths[1]), written)


def test_a_fit_after_the_merge_is_refused_before_training_and_keeps_the_merged_weights(tmp_path):
    model = TinyModel()
    callback = WUDIMergeCallback(parameters=FAST_WUDI, output=str(tmp_path / "merge"), num_tasks=1)
    make_trainer(tmp_path, [callback]).fit(model, task_loader(0))
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    counter = CountSteps()
    with pytest.raises(MergeInputError, match=r"already merged .*merged.safetensors.*fit without this callback"
                                              r".*new WUDIMergeCallback"):
        make_trainer(tmp_path, [callback, counter]).fit(model, task_loader(1))
    assert counter.steps == 0
    assert_same(model.state_dict(), merged)
    # A new callback starts a new round (here from the merged model, in another folder).
    again = WUDIMergeCallback(parameters=FAST_WUDI, output=str(tmp_path / "round2"), num_tasks=1)
    make_trainer(tmp_path, [again]).fit(model, task_loader(1))
    assert_same(load_state_dict(Path(tmp_path, "round2", "base.safetensors")), merged)


def test_a_fit_after_all_experts_were_saved_but_not_merged_is_refused(tmp_path, monkeypatch):
    model = TinyModel()
    callback = WUDIMergeCallback(parameters=FAST_WUDI, output=str(tmp_path / "merge"), num_tasks=1)
    with monkeypatch.context() as patch:
        patch.setattr(RegistryMerge, "merge", _killed)
        with pytest.raises(SystemExit):
            make_trainer(tmp_path, [callback]).fit(model, task_loader(0))
    counter = CountSteps()
    with pytest.raises(MergeInputError, match=r"all 1 experts are saved but not merged.*callback.merge\(trainer, model\)"):
        make_trainer(tmp_path, [callback, counter]).fit(model, task_loader(1))
    assert counter.steps == 0
    callback.merge(None, model)  # what the message says to do
    assert callback.merged_path is not None
