"""Hostile-user attacks on ``WUDIMergeCallback(lora_a_updates=...)`` (PEFT LoRA, sequential mode).

Bad argument values and typos, NaN/Inf in A (training and planted/corrupted ``a_start`` / Grams files),
files planted in ``grams/`` by another user or run, output folders that hold the base, crashes in fit 0 /
fit 1 / the merge and the resume that follows, manual ``merge()`` calls, include/exclude changed between
fits, zero-step fits, half precision, dropout, several adapters.

Checked each time: nothing lost, nothing written outside the output folder, no non-finite merged model
written, errors raised early and naming what is at fault. The nine bugs these cases found are fixed (a
failing case here is a regression). CPU, tiny models, a few steps per fit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from mergekit_wudi.io import load_state_dict, save_safetensors_atomic
from mergekit_wudi.lightning import MergeInputError, WUDIMergeCallback
from test_lightning_callback import CrashAt, make_trainer

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from mergekit_wudi.input_grams import load_grams  # noqa: E402
from mergekit_wudi.solvers import input_grams as gram_solvers  # noqa: E402
from test_lightning_lora import LORA_LAYERS, LoraTask, Net, lora_module, task_loader  # noqa: E402

KEYS = [f"net.{n}.weight" for n in LORA_LAYERS]
EXCLUDE = ["*head*"]
FOREIGN_RUN = "f" * 32


# ---------------------------------------------------------------------------------------------- helpers


def files_under(folder) -> dict:
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def names_under(folder) -> list:
    return sorted(files_under(folder))


def a_start_file(out, task: int) -> Path:
    return Path(out, "grams", f"task_{task}.a_start.safetensors")


def gram_file(out, task: int) -> Path:
    return Path(out, "grams", f"task_{task}.safetensors")


def pretrained() -> dict:
    return {f"net.{k}": v.detach().clone() for k, v in Net().state_dict().items()}


class Steps(Callback):
    """Counts the training steps of the fits it is given to."""

    def __init__(self):
        self.n = 0

    def on_train_batch_end(self, *args):
        self.n += 1


def callback(out=None, **kwargs) -> WUDIMergeCallback:
    kwargs.setdefault("exclude", EXCLUDE)
    kwargs.setdefault("num_tasks", 2)
    return WUDIMergeCallback(output=None if out is None else str(out), **kwargs)


def fit(tmp_path, cb, model, task, steps=3, extra=(), ckpt_path=None, **kwargs):
    make_trainer(tmp_path, [cb, *extra], max_steps=steps, **kwargs).fit(model, task_loader(task), ckpt_path=ckpt_path)


def assert_finite_merge(cb) -> dict:
    merged = load_state_dict(cb.merged_path)
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    return merged


def crash_in_fit_1(tmp_path, **kwargs):
    """Task 0 done; task 1 dies after 3 steps (checkpoint every step). Returns (out, ckpt_dir, callback)."""
    out, ckpt_dir = tmp_path / "merge", tmp_path / "ckpt"
    model, cb = lora_module(), callback(out, **kwargs)
    fit(tmp_path, cb, model, 0, steps=4)
    checkpointing = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, cb, model, 1, steps=6, extra=[checkpointing, CrashAt(3)], enable_checkpointing=True)
    assert a_start_file(out, 1).is_file() and not gram_file(out, 1).exists()
    return out, ckpt_dir, cb


def resume_fit_1(tmp_path, out, ckpt_dir, steps=None, max_steps=6, **kwargs):
    """A new process resumes task 1 from the last checkpoint."""
    cb, model = callback(out, **kwargs), lora_module()
    counter = steps or Steps()
    fit(tmp_path, cb, model, 1, steps=max_steps, extra=[counter, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        enable_checkpointing=True, ckpt_path=str(ckpt_dir / "last.ckpt"))
    return cb, model


def rewrite(path: Path, change, run_id: str) -> None:
    tensors = change(load_state_dict(path))
    save_safetensors_atomic(tensors, path, metadata={"run_id": run_id, "source": "lora_a_updates"})


# ---------------------------------------------------------------------------------------------- 1. argument values


@pytest.mark.parametrize("value", ["True", "false", "yes", "", [], {}, float("nan"), 2, "None"],
                         ids=["str-True", "str-false", "str-yes", "empty-str", "list", "dict", "nan", "int-2", "str-None"])
def test_non_bool_values_are_refused_in_the_constructor(tmp_path, value):
    with pytest.raises(TypeError, match=r"lora_a_updates must be None, True or False"):
        callback(tmp_path / "merge", lora_a_updates=value)
    assert not (tmp_path / "merge").exists()


@pytest.mark.parametrize("value", [1, 0, 1.0, 0.0, torch.tensor(True)], ids=["1", "0", "1.0", "0.0", "tensor"])
def test_numbers_equal_to_a_bool_are_refused_too(tmp_path, value):
    with pytest.raises(TypeError, match=r"lora_a_updates must be None, True or False"):
        callback(tmp_path / "merge", lora_a_updates=value)


@pytest.mark.parametrize("value, on", [(None, True), (True, True), (False, False)])
def test_the_three_allowed_values_resolve_as_documented(tmp_path, value, on):
    cb = callback(tmp_path / "merge", num_tasks=1, lora_a_updates=value)
    fit(tmp_path, cb, lora_module(), 0)
    assert cb._a_updates is on and Path(cb.merged_path).is_file()
    assert gram_file(cb.output_dir, 0).is_file() is on and a_start_file(cb.output_dir, 0).is_file() is on


@pytest.mark.parametrize("name", ["lora_a_update", "lora_a_updates_", "loraAUpdates", "a_updates", "lora_A_updates"])
def test_a_misspelt_argument_name_is_a_type_error_naming_it(name):
    with pytest.raises(TypeError, match=name):
        WUDIMergeCallback(exclude=EXCLUDE, num_tasks=2, **{name: True})


@pytest.mark.parametrize("parameters, message", [
    ({"solvr": "closed_form"}, r"unknown parameter 'solvr'.*did you mean 'solver'"),
    ({"solver": "decorelated"}, r"decorelated"),
    ({"ridg": 0.1}, r"ridg"),
], ids=["key-solvr", "value-decorelated", "key-ridg"])
def test_a_misspelt_parameters_key_or_value_is_refused_before_the_first_step(tmp_path, parameters, message):
    steps, out = Steps(), tmp_path / "merge"
    cb = callback(out, parameters=parameters, lora_a_updates=True)
    with pytest.raises(Exception, match=message):
        fit(tmp_path, cb, lora_module(), 0, extra=[steps])
    assert steps.n == 0 and files_under(out) == {}


@pytest.mark.parametrize("kwargs, message", [
    ({"experts": ["a.safetensors", "b.safetensors"]}, r"lora_a_updates=True cannot be combined with experts"),
    ({"input_grams": {"last_batches": 1}}, r"lora_a_updates=True cannot be combined with input_grams"),
    ({"lora_output": "adapter"}, r"lora_a_updates=True cannot be combined with lora_output='adapter'"),
], ids=["experts", "input_grams", "adapter"])
def test_lora_a_updates_true_clashes_are_refused_in_the_constructor(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WUDIMergeCallback(num_tasks=2, lora_a_updates=True, **kwargs)


class PlainTask(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lora_a_updates_true_on_a_module_without_lora_is_refused_in_setup(tmp_path):
    steps, out = Steps(), tmp_path / "merge"
    with pytest.raises(MergeInputError, match=r"lora_a_updates=True needs a module with PEFT LoRA layers"):
        fit(tmp_path, callback(out, lora_a_updates=True), PlainTask(), 0, extra=[steps])
    assert steps.n == 0 and files_under(out) == {}


def test_lora_a_updates_with_mudsc_is_refused_before_the_first_step(tmp_path):
    steps = Steps()
    cb = callback(tmp_path / "merge", method="mudsc", lora_a_updates=True)
    with pytest.raises(MergeInputError, match=r"mudsc"):
        fit(tmp_path, cb, lora_module(), 0, steps=2, extra=[steps])
    assert steps.n == 0


# ---------------------------------------------------------------------------------------------- 2. NaN / Inf in A


class HugeLR(LoraTask):
    def __init__(self, net, lr):
        super().__init__(net)
        self.lr = lr

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def huge_lr_module(lr) -> HugeLR:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_LAYERS), modules_to_save=["head"])
    return HugeLR(get_peft_model(Net(), config), lr)


@pytest.mark.parametrize("lr", [1e30, float("inf")], ids=["1e30", "inf"])
def test_a_that_blows_up_in_training_is_named_and_nothing_is_merged(tmp_path, lr):
    out, outside = tmp_path / "merge", tmp_path / "outside"
    outside.mkdir()
    cb = callback(out, num_tasks=1)
    with pytest.raises(ValueError, match=r"non-finite values.*fc1"):
        fit(tmp_path, cb, huge_lr_module(lr), 0, steps=4)
    assert names_under(out) == ["base.safetensors", "grams/task_0.a_start.safetensors"]  # no expert, Gram, merge
    assert cb.expert_paths == [] and cb.merged_path is None and files_under(outside) == {}
    # the same callback, a sane fit of the same task: the run goes on and merges
    fit(tmp_path, cb, lora_module(), 0, steps=3)
    assert_finite_merge(cb)
    assert load_grams(gram_file(out, 0))[1]["source"] == "lora_a_updates"


def corrupt_a_start(kind):
    def change(state):
        if kind == "nan":
            state["net.fc1.weight"][0, 0] = float("nan")
        elif kind == "inf":
            state["net.fc2.weight"][1, 1] = float("inf")
        elif kind == "shape":
            state["net.fc1.weight"] = state["net.fc1.weight"][:2].clone()
        elif kind == "missing":
            del state["net.fc1.weight"]
        elif kind == "int":
            state = {k: v.long() for k, v in state.items()}
        elif kind == "extra":
            state["net.bogus.weight"] = torch.zeros(3, 3)
        elif kind == "float16":
            state = {k: v.half() for k, v in state.items()}
        return state

    return change


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "missing", "int"])
def test_a_corrupt_a_start_on_resume_is_refused_before_the_first_step_naming_file_and_tensor(tmp_path, kind):
    out, ckpt_dir, cb = crash_in_fit_1(tmp_path)
    rewrite(a_start_file(out, 1), corrupt_a_start(kind), cb._run_id)
    steps = Steps()
    with pytest.raises(MergeInputError, match=r"task_1\.a_start\.safetensors.*net\.fc[12]\.weight|"
                                               r"net\.fc[12]\.weight.*task_1\.a_start\.safetensors"):
        resume_fit_1(tmp_path, out, ckpt_dir, steps=steps)
    assert steps.n == 0


@pytest.mark.parametrize("kind", ["extra", "float16"])
def test_a_start_with_an_extra_key_or_lower_precision_still_merges(tmp_path, kind):
    out, ckpt_dir, cb = crash_in_fit_1(tmp_path)
    rewrite(a_start_file(out, 1), corrupt_a_start(kind), cb._run_id)
    resumed, _ = resume_fit_1(tmp_path, out, ckpt_dir)
    assert_finite_merge(resumed)
    assert set(load_grams(gram_file(out, 1))[0]) == set(KEYS)


def _truncate(path: Path, cb) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _foreign(path: Path, cb) -> None:
    rewrite(path, lambda s: s, FOREIGN_RUN)


def _deleted(path: Path, cb) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [_truncate, _foreign, _deleted], ids=["truncated", "other-run-id", "deleted"])
def test_an_unusable_a_start_on_resume_warns_and_the_run_goes_on(tmp_path, damage):
    out, ckpt_dir, cb = crash_in_fit_1(tmp_path)
    damage(a_start_file(out, 1), cb)
    with pytest.warns(UserWarning, match=r"without the LoRA A it started from .*task_1\.a_start\.safetensors"):
        resumed, _ = resume_fit_1(tmp_path, out, ckpt_dir)
    assert_finite_merge(resumed)
    assert load_state_dict(a_start_file(out, 1))  # rewritten, readable, this run's


def test_a_directory_in_place_of_the_a_start_file_is_an_error_naming_it_and_nothing_is_lost(tmp_path):
    out, ckpt_dir, cb = crash_in_fit_1(tmp_path)
    path = a_start_file(out, 1)
    path.unlink()
    path.mkdir()
    (path / "user.txt").write_text("mine")
    before = files_under(out)
    steps = Steps()
    with pytest.warns(UserWarning, match="without the LoRA A"), pytest.raises(OSError, match=r"task_1\.a_start"):
        resume_fit_1(tmp_path, out, ckpt_dir, steps=steps)
    assert steps.n == 0 and files_under(out) == before


@pytest.mark.parametrize("run_id", ["own", "foreign"])
def test_an_a_start_symlink_to_a_file_outside_is_never_written_through(tmp_path, run_id):
    out, ckpt_dir, cb = crash_in_fit_1(tmp_path)
    path, outside = a_start_file(out, 1), tmp_path / "elsewhere" / "a.safetensors"
    outside.parent.mkdir()
    save_safetensors_atomic(load_state_dict(path), outside, metadata={
        "run_id": cb._run_id if run_id == "own" else FOREIGN_RUN})
    path.unlink()
    path.symlink_to(outside)
    before = outside.read_bytes()
    resumed, _ = resume_fit_1(tmp_path, out, ckpt_dir)
    assert_finite_merge(resumed)
    assert outside.read_bytes() == before and sorted(os.listdir(outside.parent)) == ["a.safetensors"]


# ---------------------------------------------------------------------------------------------- 3. Grams at the merge


class KilledInMerge(Exception):
    pass


@pytest.fixture(scope="module")
def killed_merge(tmp_path_factory):
    """Both tasks trained; the merge killed inside the Gram solve. Returns (folder, callback state)."""
    root = tmp_path_factory.mktemp("killed")
    out, model = root / "merge", lora_module()
    cb = callback(out)
    fit(root, cb, model, 0)
    original = gram_solvers.merge_with_grams

    def killed(*args, **kwargs):
        raise KilledInMerge("killed in the merge")

    gram_solvers.merge_with_grams = killed
    try:
        with pytest.raises(KilledInMerge):
            fit(root, cb, model, 1)
    finally:
        gram_solvers.merge_with_grams = original
    assert cb.merged_path is None and len(cb.expert_paths) == 2
    assert names_under(out) == ["base.safetensors", "experts/task_0.safetensors", "experts/task_1.safetensors",
                                "grams/task_0.a_start.safetensors", "grams/task_0.safetensors",
                                "grams/task_1.a_start.safetensors", "grams/task_1.safetensors"]
    return out, cb.state_dict()


def restored(killed_merge, tmp_path):
    """A copy of the killed run's folder and a new callback holding its state (paths moved to the copy)."""
    src, state = killed_merge
    out = tmp_path / "merge"
    shutil.copytree(src, out, symlinks=True)
    move = lambda p: None if p is None else p.replace(str(src), str(out))  # noqa: E731
    state = {**state, "output": move(state["output"]), "base": move(state["base"]),
             "experts": [move(p) for p in state["experts"]], "heads": [move(p) for p in state["heads"]]}
    cb = callback(out)
    cb.load_state_dict(state)
    return out, cb


def test_after_a_killed_merge_nothing_is_lost_and_merge_can_be_called_again(killed_merge, tmp_path):
    out, cb = restored(killed_merge, tmp_path)
    before = files_under(out)
    cb.merge(None, lora_module())
    assert_finite_merge(cb)
    after = files_under(out)
    assert all(after[name] == data for name, data in before.items())  # inputs untouched
    assert cb._a_updates


def test_after_a_killed_merge_a_resume_from_the_last_checkpoint_merges(tmp_path):
    out, ckpt_dir = tmp_path / "merge", tmp_path / "ckpt"
    model, cb = lora_module(), callback(out)
    fit(tmp_path, cb, model, 0)
    original = gram_solvers.merge_with_grams
    gram_solvers.merge_with_grams = lambda *a, **k: (_ for _ in ()).throw(KilledInMerge("killed"))
    try:
        with pytest.raises(KilledInMerge):
            fit(tmp_path, cb, model, 1, extra=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1,
                                                               save_last=True)], enable_checkpointing=True)
    finally:
        gram_solvers.merge_with_grams = original
    assert not Path(out, "merged.safetensors").exists()
    steps = Steps()
    resumed, _ = resume_fit_1(tmp_path, out, ckpt_dir, steps=steps, max_steps=3)
    assert resumed._a_updates and steps.n == 0
    assert_finite_merge(resumed)


def test_a_fresh_run_into_a_killed_runs_output_is_refused_and_changes_nothing(killed_merge, tmp_path):
    out, _ = restored(killed_merge, tmp_path)
    before, steps = files_under(out), Steps()
    with pytest.raises(MergeInputError, match=r"already holds another run.s results"):
        fit(tmp_path, callback(out), lora_module(), 0, extra=[steps])
    assert steps.n == 0 and files_under(out) == before


def _grams_change(kind):
    def change(t):
        f, d = "net.fc1.weight.gram_factor", "net.fc1.weight.gram_diagonal"
        if kind == "nan":
            t[f][0, 0] = float("nan")
        elif kind == "shape":
            t[f], t[d] = torch.randn(5, 4), torch.rand(5)
        elif kind == "missing-diagonal":
            del t[d]
        elif kind == "huge":
            t = {k: v * 1e25 for k, v in t.items()}
        return t

    return change


@pytest.mark.parametrize("kind", ["truncated", "directory", "nan", "shape", "missing-diagonal", "huge"])
def test_a_corrupt_grams_file_at_the_merge_is_an_error_naming_file_and_tensor(killed_merge, tmp_path, kind):
    out, cb = restored(killed_merge, tmp_path)
    path = gram_file(out, 1)
    if kind == "truncated":
        _truncate(path, cb)
    elif kind == "directory":
        path.unlink()
        path.mkdir()
    else:
        rewrite(path, _grams_change(kind), cb._run_id)
    tensor = r"" if kind in ("truncated", "directory") else r".*net\.fc1\.weight|net\.fc1\.weight.*"
    # "huge": every layer's factor x 1e25 (finite in the file, its products are not): the first layer solved is named
    message = (r"Grams of 'net\.fc[12]\.weight': non-finite .* task 1" if kind == "huge"
               else r"grams/task_1\.safetensors" + tensor)
    with pytest.raises(MergeInputError, match=message):
        cb.merge(None, lora_module())
    assert not Path(out, "merged.safetensors").exists()


@pytest.mark.parametrize("kind", ["gone", "missing-layer"])
def test_a_missing_grams_file_or_layer_is_an_error_naming_it(killed_merge, tmp_path, kind):
    out, cb = restored(killed_merge, tmp_path)
    path = gram_file(out, 1)
    if kind == "gone":
        path.unlink()
        message = r"task_1.*grams/task_1\.safetensors is missing"
    else:
        rewrite(path, lambda t: {k: v for k, v in t.items() if not k.startswith("net.fc1.")}, cb._run_id)
        message = r"\['net\.fc1\.weight'\] exist for some experts only"
    with pytest.raises(MergeInputError, match=message):
        cb.merge(None, lora_module())
    assert not Path(out, "merged.safetensors").exists()


def test_a_grams_file_of_another_run_is_not_merged(killed_merge, tmp_path):
    out, cb = restored(killed_merge, tmp_path)
    rewrite(gram_file(out, 1), lambda t: {k: 100 * v for k, v in t.items()}, FOREIGN_RUN)
    with pytest.raises(MergeInputError, match=r"grams/task_1\.safetensors"):
        cb.merge(None, lora_module())


# ---------------------------------------------------------------------------------------------- 4. planted files


def test_unrelated_user_files_in_grams_are_left_alone(tmp_path):
    out = tmp_path / "merge"
    grams = out / "grams"
    grams.mkdir(parents=True)
    (grams / "notes.txt").write_text("my notes")
    save_safetensors_atomic({"w": torch.ones(2)}, grams / "model.safetensors", metadata={"run_id": FOREIGN_RUN})
    save_safetensors_atomic({"w": torch.ones(2)}, grams / "task_0.a_start.safetensors.bak")
    (grams / ".task_0.safetensors.tmp-abc").write_bytes(b"half written")
    before = files_under(out)
    cb = callback(out, num_tasks=1)
    fit(tmp_path, cb, lora_module(), 0)
    assert_finite_merge(cb)
    after = files_under(out)
    assert all(after[name] == data for name, data in before.items())


def plant(grams: Path, kind: str, tmp_path: Path) -> None:
    grams.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.randn(4, 6 if "fc1" in k else 12) for k in KEYS}
    if kind == "a_start":
        save_safetensors_atomic(tensors, grams / "task_0.a_start.safetensors", metadata={"run_id": FOREIGN_RUN})
    elif kind == "a_start-no-metadata":
        save_safetensors_atomic(tensors, grams / "task_0.a_start.safetensors")
    elif kind == "gram":
        save_safetensors_atomic(tensors, grams / "task_0.safetensors", metadata={"run_id": FOREIGN_RUN})
    elif kind == "gram-task-7":
        save_safetensors_atomic(tensors, grams / "task_7.safetensors", metadata={"run_id": FOREIGN_RUN})
    elif kind == "directory":
        (grams / "task_0.a_start.safetensors").mkdir()
        (grams / "task_0.a_start.safetensors" / "x").write_text("mine")
    elif kind == "symlink-outside":
        target = tmp_path / "outside" / "precious.safetensors"
        target.parent.mkdir(exist_ok=True)
        save_safetensors_atomic(tensors, target, metadata={"run_id": FOREIGN_RUN})
        (grams / "task_0.a_start.safetensors").symlink_to(target)


PLANTED = ["a_start", "a_start-no-metadata", "gram", "gram-task-7", "directory", "symlink-outside"]


@pytest.mark.parametrize("kind", PLANTED)
def test_a_given_output_with_a_planted_grams_file_is_refused_before_the_first_step(tmp_path, kind):
    out = tmp_path / "merge"
    plant(out / "grams", kind, tmp_path)
    before, outside, steps = files_under(out), files_under(tmp_path / "outside"), Steps()
    with pytest.raises(MergeInputError, match=r"already holds another run.s results \(grams/task_"):
        fit(tmp_path, callback(out), lora_module(), 0, extra=[steps])
    assert steps.n == 0 and files_under(out) == before and files_under(tmp_path / "outside") == outside


@pytest.mark.parametrize("kind", ["a_start", "directory", "symlink-outside"])
def test_the_default_output_versions_past_a_planted_grams_file(tmp_path, kind):
    plant(tmp_path / "merge" / "grams", kind, tmp_path)
    before, outside = files_under(tmp_path / "merge"), files_under(tmp_path / "outside")
    cb = callback(None, num_tasks=1)
    fit(tmp_path, cb, lora_module(), 0)
    assert cb.output_dir == str(tmp_path / "merge-v1")
    assert_finite_merge(cb)
    assert files_under(tmp_path / "merge") == before and files_under(tmp_path / "outside") == outside


def test_an_output_folder_that_holds_the_base_file_keeps_it_and_user_files(tmp_path):
    base = tmp_path / "pretrained.safetensors"
    save_safetensors_atomic(pretrained(), base)
    (tmp_path / "notes.txt").write_text("mine")
    before = files_under(tmp_path)
    cb = callback(tmp_path, num_tasks=1, base=str(base))
    fit(tmp_path, cb, lora_module(), 0)
    assert_finite_merge(cb)
    after = files_under(tmp_path)
    assert all(after[name] == data for name, data in before.items())
    assert set(after) - set(before) <= {"merged.safetensors", "experts/task_0.safetensors", "heads/task_0.safetensors",
                                        "grams/task_0.safetensors", "grams/task_0.a_start.safetensors"}


@pytest.mark.parametrize("where", ["grams/task_0.a_start.safetensors", "grams/pretrained.safetensors",
                                   "base.safetensors", "experts/task_1.safetensors"])
def test_a_base_file_where_the_callback_writes_is_refused_before_the_first_step(tmp_path, where):
    out, steps = tmp_path / "merge", Steps()
    base = out / where
    base.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(pretrained(), base)
    before = files_under(out)
    with pytest.raises(MergeInputError, match=r"base .* lies where this callback writes"):
        fit(tmp_path, callback(out, base=str(base)), lora_module(), 0, extra=[steps])
    assert steps.n == 0 and files_under(out) == before


def test_a_regular_file_named_grams_is_an_error_naming_it_before_the_first_step(tmp_path):
    out, steps = tmp_path / "merge", Steps()
    out.mkdir()
    (out / "grams").write_text("a user's file")
    with pytest.raises(OSError, match=r"grams"):
        fit(tmp_path, callback(out), lora_module(), 0, extra=[steps])
    assert steps.n == 0 and (out / "grams").read_text() == "a user's file"


def test_a_read_only_grams_folder_fails_before_the_first_step(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions are not enforced")
    out, steps = tmp_path / "merge", Steps()
    (out / "grams").mkdir(parents=True)
    (out / "grams").chmod(0o555)
    try:
        with pytest.raises(OSError):
            fit(tmp_path, callback(out), lora_module(), 0, extra=[steps])
        assert steps.n == 0
    finally:
        (out / "grams").chmod(0o755)


# ---------------------------------------------------------------------------------------------- 5. crash / resume


def test_a_crash_in_fit_0_resumed_in_a_new_process_merges(tmp_path):
    out, ckpt_dir = tmp_path / "merge", tmp_path / "ckpt"
    cb, model = callback(out), lora_module()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, cb, model, 0, steps=6, extra=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1,
                                                                    save_last=True), CrashAt(3)],
            enable_checkpointing=True)
    assert names_under(out) == ["base.safetensors", "grams/task_0.a_start.safetensors"]
    start = load_state_dict(a_start_file(out, 0))
    cb, model = callback(out), lora_module()
    fit(tmp_path, cb, model, 0, steps=6, extra=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        enable_checkpointing=True, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert all(torch.equal(load_state_dict(a_start_file(out, 0))[k], start[k]) for k in KEYS)  # not overwritten
    fit(tmp_path, cb, model, 1)
    assert_finite_merge(cb)


@pytest.mark.parametrize("given", [True, False], ids=["given-output", "default-output"])
def test_a_fresh_run_after_a_crash_in_fit_0_never_touches_the_crashed_runs_files(tmp_path, given):
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, callback(tmp_path / "merge" if given else None), lora_module(), 0, steps=6, extra=[CrashAt(2)])
    kept = files_under(tmp_path / "merge")
    assert sorted(kept) == ["base.safetensors", "grams/task_0.a_start.safetensors"]
    cb = callback(tmp_path / "merge" if given else None, num_tasks=1)
    if given:
        with pytest.raises(MergeInputError, match="already holds another run"):
            fit(tmp_path, cb, lora_module(), 0)
    else:
        fit(tmp_path, cb, lora_module(), 0)
        assert cb.output_dir == str(tmp_path / "merge-v1")
        assert_finite_merge(cb)
    assert files_under(tmp_path / "merge") == kept


def test_resuming_with_lora_a_updates_switched_on_is_refused_before_the_first_step(tmp_path):
    out, ckpt_dir, _ = _crash_off(tmp_path)
    steps = Steps()
    with pytest.raises(MergeInputError, match=r"task_0"):
        resume_fit_1(tmp_path, out, ckpt_dir, steps=steps, lora_a_updates=True)
    assert steps.n == 0


def _crash_off(tmp_path):
    out, ckpt_dir = tmp_path / "merge", tmp_path / "ckpt"
    model, cb = lora_module(), callback(out, lora_a_updates=False)
    fit(tmp_path, cb, model, 0, steps=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, cb, model, 1, steps=6, extra=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1,
                                                                    save_last=True), CrashAt(3)],
            enable_checkpointing=True)
    return out, ckpt_dir, cb


def test_resuming_with_lora_a_updates_switched_off_gives_the_plain_merge(tmp_path):
    out, ckpt_dir, _ = crash_in_fit_1(tmp_path)
    resumed, _ = resume_fit_1(tmp_path, out, ckpt_dir, lora_a_updates=False)
    assert not resumed._a_updates
    assert_finite_merge(resumed)
    assert not gram_file(out, 1).exists() and gram_file(out, 0).is_file()  # task 0's Gram kept, not used


# ---------------------------------------------------------------------------------------------- 6. merge() by hand


def test_merge_before_all_tasks_merges_what_is_there_and_refuses_further_fits(tmp_path):
    out, model = tmp_path / "merge", lora_module()
    cb = callback(out)
    fit(tmp_path, cb, model, 0)
    cb.merge(None, model)
    assert_finite_merge(cb)
    before, steps = files_under(out), Steps()
    with pytest.raises(MergeInputError, match="already merged its 1 experts"):
        fit(tmp_path, cb, model, 1, extra=[steps])
    assert steps.n == 0 and files_under(out) == before


def two_tasks(tmp_path):
    out, model = tmp_path / "merge", lora_module()
    cb = callback(out)
    for task in range(2):
        fit(tmp_path, cb, model, task)
    return out, cb, model, load_state_dict(cb.merged_path)


def test_merge_twice_gives_the_same_file(tmp_path):
    out, cb, model, first = two_tasks(tmp_path)
    cb.merge(None, model)
    second = load_state_dict(cb.merged_path)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_merge_with_a_different_module_keeps_the_runs_recipe(tmp_path):
    out, cb, model, first = two_tasks(tmp_path)
    try:
        cb.merge(None, PlainTask())
    except MergeInputError:
        return  # refusing is fine too
    second = load_state_dict(cb.merged_path)
    assert cb._a_updates and cb.parameters == {"solver": "decorrelated"}
    for key in KEYS:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0)


def test_a_restored_callback_merging_without_a_module_keeps_the_runs_recipe(killed_merge, tmp_path):
    out, cb = restored(killed_merge, tmp_path)
    _, ref = restored(killed_merge, tmp_path / "ref")
    expected = ref.merge(None, lora_module())
    try:
        merged = cb.merge()
    except MergeInputError:
        return  # refusing is fine too
    for key in KEYS:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=0)


def test_a_failed_merge_before_any_fit_does_not_pin_the_output_to_the_cwd(tmp_path, monkeypatch):
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cb = callback(None, num_tasks=1)
    with pytest.raises(MergeInputError, match="no experts to merge"):
        cb.merge(None, lora_module())
    fit(root, cb, lora_module(), 0)
    assert list(cwd.iterdir()) == []
    assert cb.output_dir == str(root / "merge")


# ---------------------------------------------------------------------------------------------- 7. include / exclude


def test_excluding_a_layer_after_fit_0_merges_the_rest(tmp_path):
    out, model = tmp_path / "merge", lora_module()
    cb = callback(out)
    fit(tmp_path, cb, model, 0)
    cb.exclude = EXCLUDE + ["net.fc2"]
    fit(tmp_path, cb, model, 1)
    merged = assert_finite_merge(cb)
    assert "net.fc2.weight" not in merged and "net.fc1.weight" in merged
    assert set(load_grams(gram_file(out, 1))[0]) == {"net.fc1.weight"}


def test_including_a_layer_after_fit_0_is_an_error_naming_it_and_recoverable(tmp_path):
    out, model = tmp_path / "merge", lora_module()
    cb = callback(out, exclude=EXCLUDE + ["net.fc2"])
    fit(tmp_path, cb, model, 0)
    cb.exclude = list(EXCLUDE)
    with pytest.raises(MergeInputError, match=r"\['net\.fc2\.weight'\] exist for some experts only"):
        fit(tmp_path, cb, model, 1)
    assert not Path(out, "merged.safetensors").exists() and len(cb.expert_paths) == 2
    cb.exclude = EXCLUDE + ["net.fc2"]  # back to the settings of task 0: the saved experts merge
    cb.merge(None, model)
    assert "net.fc2.weight" not in assert_finite_merge(cb)


# ---------------------------------------------------------------------------------------------- 8. edges


@pytest.mark.parametrize("kwargs", [{"limit_train_batches": 0}, {"max_steps": 0}], ids=["no-batches", "max_steps-0"])
def test_a_fit_with_zero_steps_saves_nothing_and_the_next_fit_is_still_task_0(tmp_path, kwargs):
    out, model = tmp_path / "merge", lora_module()
    cb = callback(out, num_tasks=1)
    options = {"max_steps": 3, **kwargs}
    with pytest.warns(UserWarning, match="ran no training step"):
        make_trainer(tmp_path, [cb], **options).fit(model, task_loader(0))
    assert cb.expert_paths == [] and names_under(out) == ["base.safetensors"]
    fit(tmp_path, cb, model, 0)
    assert_finite_merge(cb)
    assert names_under(out) == ["base.safetensors", "experts/task_0.safetensors", "grams/task_0.a_start.safetensors",
                                "grams/task_0.safetensors", "heads/task_0.safetensors", "merged.safetensors"]


def test_num_tasks_1_merges_one_expert_with_its_a_update(tmp_path):
    cb = callback(tmp_path / "merge", num_tasks=1)
    fit(tmp_path, cb, lora_module(), 0)
    merged = assert_finite_merge(cb)
    assert set(KEYS) <= set(merged) and load_grams(gram_file(cb.output_dir, 0))[1]["source"] == "lora_a_updates"
    assert sorted(os.listdir(tmp_path)) == ["merge"]  # nothing written outside the output folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_precision_module_merges_finite_in_its_dtype(tmp_path, dtype):
    model, cb = lora_module().to(dtype), callback(tmp_path / "merge")
    for task in range(2):
        x, y = (t.to(dtype) for t in task_loader(task).dataset.tensors)
        make_trainer(tmp_path, [cb], max_steps=3).fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    merged = assert_finite_merge(cb)
    assert all(merged[k].dtype == dtype for k in KEYS)
    assert all(t.dtype == dtype for t in load_state_dict(a_start_file(cb.output_dir, 1)).values())
    grams = load_grams(gram_file(cb.output_dir, 1))[0]
    assert all(bool(torch.isfinite(grams[k].factor).all()) and float(grams[k].factor.norm()) > 0 for k in KEYS)


def test_lora_dropout_still_merges_with_a_updates(tmp_path):
    model, cb = lora_module(lora_dropout=0.3), callback(tmp_path / "merge")
    for task in range(2):
        fit(tmp_path, cb, model, task)
    assert cb._a_updates
    assert_finite_merge(cb)


def test_a_second_inactive_adapter_is_ignored_and_the_active_ones_a_is_recorded(tmp_path):
    model = lora_module()
    model.net.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=list(LORA_LAYERS)))
    cb = callback(tmp_path / "merge")
    for task in range(2):
        fit(tmp_path, cb, model, task)
    assert_finite_merge(cb)
    starts = load_state_dict(a_start_file(cb.output_dir, 0))
    assert {k: tuple(v.shape) for k, v in starts.items()} == {"net.fc1.weight": (4, 6), "net.fc2.weight": (4, 12)}


def test_two_active_adapters_are_refused_before_the_first_step(tmp_path):
    model = lora_module()
    model.net.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=list(LORA_LAYERS)))
    model.net.base_model.set_adapter(["default", "other"])
    out, steps = tmp_path / "merge", Steps()
    with pytest.raises(MergeInputError, match=r"several active adapters \['default', 'other'\]"):
        fit(tmp_path, callback(out), model, 0, extra=[steps])
    assert steps.n == 0 and files_under(out) == {}
