"""WUDIMergeCallback's hooks and modes: real lightning.Trainer runs on CPU with a tiny model (a few steps each).

The helpers here (TinyModel, task_loader, make_trainer, direct_merge, assert_same, write_inputs) are
shared by tests/test_lightning_checks.py and tests/test_lightning_strategies.py.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mergekit.merge_methods.api import merge_state_dicts
from mergekit.merge_methods.base import PerGroupValues
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mergekit_wudi.io import load_state_dict, save_safetensors_atomic
from mergekit_wudi.lightning import WUDIMergeCallback

FAST_WUDI = {"iterations": 20, "learning_rate": 1e-2}


class TinyModel(LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def task_loader(task: int) -> DataLoader:
    g = torch.Generator().manual_seed(100 + task)
    x = torch.randn(16, 4, generator=g)
    y = torch.randn(16, 2, generator=g) + task
    return DataLoader(TensorDataset(x, y), batch_size=8)


def make_trainer(root, callbacks, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
    )
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def direct_merge(method, parameters, base_path, expert_paths, model, names=None):
    """merge_state_dicts called directly on the saved files, as a user would."""
    base = load_state_dict(base_path)
    names = names or list(base)
    inputs = {"base": {n: base[n] for n in names}}
    for i, path in enumerate(expert_paths):
        state = load_state_dict(path)
        inputs[f"task_{i}"] = {n: state[n] for n in names}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    parameters = dict(parameters)
    if method == "wudi":
        parameters["linear"] = PerGroupValues([n in linear for n in names])
    return merge_state_dicts(inputs, method, parameters=parameters, base="base")


def assert_same(actual, expected):
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def write_inputs(tmp_path, expert_edit=lambda state, base: state):
    """base.safetensors and two expert files (expert 1 passed through ``expert_edit``)."""
    base = TinyModel().state_dict()
    paths = []
    for task in range(2):
        state = {n: t + 0.01 * (task + 1) for n, t in base.items()}
        if task == 1:
            state = expert_edit(state, base)
        paths.append(str(tmp_path / f"e{task}.safetensors"))
        save_safetensors_atomic(state, paths[-1])
    save_safetensors_atomic(base, tmp_path / "base.safetensors")
    return str(tmp_path / "base.safetensors"), paths


def test_sequential_three_tasks_match_direct_merge(tmp_path):
    model = TinyModel()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    callback = WUDIMergeCallback(parameters=FAST_WUDI, output=str(tmp_path / "merge"), num_tasks=3)
    for task in range(3):
        make_trainer(tmp_path, [callback]).fit(model, task_loader(task))
        assert len(callback.expert_paths) == task + 1

    out = tmp_path / "merge"
    assert callback.merged_path == str(out / "merged.safetensors")
    assert_same(load_state_dict(out / "base.safetensors"), pretrained)
    experts = [load_state_dict(p) for p in callback.expert_paths]
    # reset_to_base: every task started from the pretrained weights, so the experts differ from each other.
    assert not torch.equal(experts[1]["body.0.weight"], experts[2]["body.0.weight"])

    expected = direct_merge("wudi", FAST_WUDI, out / "base.safetensors", callback.expert_paths, model)
    assert_same(load_state_dict(callback.merged_path), expected)
    assert_same(model.state_dict(), expected)  # load_merged
    # LayerNorm follows non_linear="base"; Linear weights are solved, so they moved.
    assert torch.equal(expected["body.1.weight"], pretrained["body.1.weight"])
    assert not torch.equal(expected["body.0.weight"], pretrained["body.0.weight"])


def test_explicit_ckpt_mode_with_heads_and_another_method(tmp_path):
    pretrained = TinyModel()
    base_path = tmp_path / "pretrained.safetensors"
    save_safetensors_atomic(pretrained.state_dict(), base_path)
    ckpts = []
    for task in range(2):
        expert = TinyModel()
        trainer = make_trainer(tmp_path, [])
        trainer.fit(expert, task_loader(task))
        ckpts.append(str(tmp_path / f"task{task}.ckpt"))
        trainer.save_checkpoint(ckpts[-1])

    parameters = {"weight": [0.7, 0.3]}
    callback = WUDIMergeCallback(
        method="task_arithmetic", parameters=parameters, experts=ckpts, base=str(base_path),
        exclude=["head"], output=str(tmp_path / "out"),
    )
    model = TinyModel()
    make_trainer(tmp_path, [callback], max_steps=1).fit(model, task_loader(5))

    body = [n for n in pretrained.state_dict() if not n.startswith("head")]
    expected = direct_merge("task_arithmetic", parameters, base_path, ckpts, model, names=body)
    merged = load_state_dict(callback.merged_path)
    assert_same(merged, expected)
    for task, ckpt in enumerate(ckpts):
        trained = torch.load(ckpt, weights_only=True)["state_dict"]
        head = load_state_dict(tmp_path / "out" / "heads" / f"task_{task}.safetensors")
        assert_same(head, {n: trained[n] for n in ("head.weight", "head.bias")})
        assert_same(callback.task_heads[task], head)
    callback.load_task_head(model, 0)
    assert_same({n: model.state_dict()[n] for n in body}, expected)
    assert torch.equal(model.head.weight, callback.task_heads[0]["head.weight"])


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated crash")


def test_resume_knows_which_experts_are_done(tmp_path):
    out, ckpt_dir = str(tmp_path / "merge"), tmp_path / "ckpt"
    model = TinyModel()
    callback = WUDIMergeCallback(parameters=FAST_WUDI, output=out, num_tasks=2)
    make_trainer(tmp_path, [callback]).fit(model, task_loader(0))
    checkpointing = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, [callback, checkpointing, CrashAt(2)], max_steps=3, enable_checkpointing=True).fit(
            model, task_loader(1)
        )
    assert callback.merged_path is None and len(callback.expert_paths) == 1

    # A fresh process: new module, new callback; the checkpoint brings the callback state back.
    resumed = WUDIMergeCallback(parameters=FAST_WUDI, output=out, num_tasks=2)
    model = TinyModel(seed=1)
    checkpointing = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True)
    trainer = make_trainer(tmp_path, [resumed, checkpointing], max_steps=3, enable_checkpointing=True)
    trainer.fit(model, task_loader(1), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert resumed.expert_paths == callback.expert_paths + [str(Path(out, "experts", "task_1.safetensors"))]
    expected = direct_merge("wudi", FAST_WUDI, Path(out, "base.safetensors"), resumed.expert_paths, model)
    assert_same(load_state_dict(resumed.merged_path), expected)
    assert resumed.state_dict()["merged"] == resumed.merged_path


def test_spawned_fits_are_recovered_from_the_files_they_wrote(tmp_path):
    """ddp_spawn fits a pickled copy of the callback; the parent's copy catches up from the files
    (labelled with the run id), not from a second copy of the state."""
    out = str(tmp_path / "merge")
    model = TinyModel()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    parent = WUDIMergeCallback(parameters=FAST_WUDI, output=out, num_tasks=2)
    worker = pickle.loads(pickle.dumps(parent))  # what a spawned worker gets
    make_trainer(tmp_path, [worker]).fit(model, task_loader(0))
    assert parent.expert_paths == [] and len(worker.expert_paths) == 1
    assert not Path(out, "merge_state.json").exists()
    # A stale expert file of another run is never taken for ours.
    save_safetensors_atomic(pretrained, Path(out, "experts", "task_1.safetensors"), metadata={"run_id": "other"})
    make_trainer(tmp_path, [parent]).fit(model, task_loader(1))
    assert parent.expert_paths == worker.expert_paths + [str(Path(out, "experts", "task_1.safetensors"))]
    assert_same(load_state_dict(Path(out, "base.safetensors")), pretrained)  # the base was not re-snapshotted
    expected = direct_merge("wudi", FAST_WUDI, Path(out, "base.safetensors"), parent.expert_paths, model)
    assert_same(load_state_dict(parent.merged_path), expected)


def test_a_new_run_never_replaces_an_earlier_runs_files(tmp_path):
    """Default output: a second run moves on to merge-v1 (ModelCheckpoint's versioning); a given output= that
    holds another run's files is refused before the first step, and those files stay as they were."""
    first = WUDIMergeCallback(parameters=FAST_WUDI, num_tasks=1)
    make_trainer(tmp_path, [first]).fit(TinyModel(), task_loader(0))
    assert first.output_dir == str(tmp_path / "merge")
    kept = {p: p.read_bytes() for p in Path(first.output_dir).rglob("*.safetensors")}
    assert len(kept) == 3  # base, the expert, the merge

    second = WUDIMergeCallback(parameters=FAST_WUDI, num_tasks=1)
    make_trainer(tmp_path, [second]).fit(TinyModel(seed=1), task_loader(1))
    assert second.output_dir == str(tmp_path / "merge-v1")
    assert Path(second.merged_path).is_file()

    given = WUDIMergeCallback(parameters=FAST_WUDI, num_tasks=1, output=first.output_dir)
    model = TinyModel(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"already holds another run.s results \(base.safetensors, "
                                         r"merged.safetensors, experts/task_0.safetensors\)"):
        make_trainer(tmp_path, [given]).fit(model, task_loader(2))
    assert_same(model.state_dict(), before)  # refused before any training step
    assert {p: p.read_bytes() for p in Path(first.output_dir).rglob("*.safetensors")} == kept

    # Explicit mode merged by hand (inputs copied out of the folder): its earlier merge is not replaced either.
    inputs = []
    for name, path in (("base", Path(first.output_dir, "base.safetensors")), ("a", first.expert_paths[0]),
                       ("b", second.expert_paths[0])):
        inputs.append(tmp_path / f"{name}.safetensors")
        inputs[-1].write_bytes(Path(path).read_bytes())
    explicit = WUDIMergeCallback(parameters=FAST_WUDI, experts=[str(p) for p in inputs[1:]], base=str(inputs[0]),
                                 output=first.output_dir, exclude=["head"])
    with pytest.raises(ValueError, match=r"already holds another run.s results"):
        explicit.merge()
    assert {p: p.read_bytes() for p in Path(first.output_dir).rglob("*.safetensors")} == kept


class StepCounter(Callback):
    count = 0

    def on_train_batch_start(self, *args):
        self.count += 1


def test_versioning_keeps_a_spawned_run_together_and_a_plain_checkpoint_is_not_a_resume(tmp_path, monkeypatch):
    """ddp_spawn copies of one callback (each decides the folder in its own setup) agree on merge-v1 and merge
    there; a fit from a checkpoint without this callback's state is a new run (refused in a given output= that
    holds another run's files, before any step); a merge() without a fit also versions; a user's own file in
    experts/ is not the callback's."""
    earlier = WUDIMergeCallback(parameters=FAST_WUDI, num_tasks=1)
    make_trainer(tmp_path, [earlier]).fit(TinyModel(seed=5), task_loader(0))
    kept = {p: p.read_bytes() for p in Path(earlier.output_dir).rglob("*.safetensors")}
    parent = WUDIMergeCallback(parameters=FAST_WUDI, num_tasks=2)
    model = TinyModel()
    workers = [pickle.loads(pickle.dumps(parent)) for _ in range(2)]
    for task, worker in enumerate(workers):
        make_trainer(tmp_path, [worker]).fit(model, task_loader(task))
    assert workers[1].output_dir == str(tmp_path / "merge-v1") and workers[1].merged_path is not None
    assert [Path(p).name for p in workers[1].expert_paths] == ["task_0.safetensors", "task_1.safetensors"]

    checkpointing = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [checkpointing], enable_checkpointing=True).fit(TinyModel(), task_loader(3))
    given = WUDIMergeCallback(parameters=FAST_WUDI, num_tasks=1, output=earlier.output_dir,
                              base=str(tmp_path / "merge-v1" / "base.safetensors"))
    steps = StepCounter()
    with pytest.raises(ValueError, match="already holds another run's results"):
        make_trainer(tmp_path, [given, steps], max_steps=4).fit(TinyModel(), task_loader(1),
                                                                 ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert steps.count == 0
    assert {p: p.read_bytes() for p in Path(earlier.output_dir).rglob("*.safetensors")} == kept

    Path(tmp_path, "mine").mkdir()
    monkeypatch.chdir(tmp_path / "mine")  # merge() without a trainer writes under ./merge
    for _ in range(2):
        alone = WUDIMergeCallback(method="task_arithmetic", parameters={"weight": 1.0},
                                  experts=workers[1].expert_paths, base=str(tmp_path / "merge-v1" / "base.safetensors"))
        alone.merge()
    assert Path(alone.output_dir).name == "merge-v1" and Path(tmp_path, "mine", "merge", "merged.safetensors").is_file()
    save_safetensors_atomic(TinyModel().state_dict(), Path(tmp_path, "mine", "own", "experts", "mine.safetensors"))
    assert WUDIMergeCallback(experts=workers[1].expert_paths, output="own")._store().other_runs_files() == []


def test_a_settings_warning_is_said_once_per_run(tmp_path, caplog):
    callback = WUDIMergeCallback(parameters={"solver": "closed_form", "prior": 0.3}, num_tasks=2)
    with caplog.at_level("WARNING"):
        for task in range(2):
            make_trainer(tmp_path, [callback]).fit(TinyModel(), task_loader(task))
    assert callback.merged_path is not None
    assert caplog.text.count("prior is ignored") == 1


def test_picklable_and_checkpointable_state():
    callback = WUDIMergeCallback(method="ties", parameters={"weight": 1.0, "density": 0.5}, exclude=["head"])
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.state_key == callback.state_key and clone.parameters == callback.parameters
    state = callback.state_dict()
    assert set(state) == {"run_id", "output", "base", "experts", "heads", "merged"}
    clone.load_state_dict(state)
    assert clone.state_dict() == state


def test_lightning_cli_class_path(tmp_path):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse (lightning[pytorch-extra])")
    from lightning.pytorch.cli import LightningCLI

    config = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "mergekit_wudi.lightning.WUDIMergeCallback",
                    "init_args": {"parameters": {"solver": "closed_form"}, "exclude": ["head"], "num_tasks": 2},
                }
            ],
            "logger": False,
            "default_root_dir": str(tmp_path),
        }
    }
    cli = LightningCLI(TinyModel, run=False, args=config, save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, WUDIMergeCallback)]
    assert callback.parameters == {"solver": "closed_form"} and callback.num_tasks == 2


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_lightning_callback import TinyModel, task_loader, make_trainer, FAST_WUDI
from mergekit_wudi.lightning import WUDIMergeCallback

out = sys.argv[1]
model = TinyModel()
callback = WUDIMergeCallback(parameters=FAST_WUDI, output=os.path.join(out, "merge"), num_tasks=2)
for task in range(2):
    trainer = make_trainer(out, [callback], devices=2, strategy="ddp", enable_progress_bar=True)
    trainer.fit(model, task_loader(task))
torch.save({{"state": model.state_dict(), "experts": callback.expert_paths}},
           os.path.join(out, f"rank{{trainer.global_rank}}.pt"))
"""


def run_ddp_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    """Run ``source`` (a template with ``{tests}``) as a script with the output folder as its argument; it
    must succeed (2 CPU processes under ``strategy="ddp"``, no fork)."""
    script = tmp_path / "ddp_run.py"
    script.write_text(source.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PL_DISABLE_FORK="1")
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_ddp_two_processes_identical_result(tmp_path):
    run = run_ddp_script(tmp_path, DDP_SCRIPT)
    assert "sharded over 2 ranks" in run.stdout + run.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert_same(ranks[0]["state"], ranks[1]["state"])
    merge_dir = tmp_path / "merge"
    expected = direct_merge("wudi", FAST_WUDI, merge_dir / "base.safetensors", ranks[0]["experts"], TinyModel())
    assert_same(ranks[0]["state"], expected)
    assert_same(load_state_dict(merge_dir / "merged.safetensors"), expected)


def test_mudsc_strategy_at_fit_end_keeps_aligned_heads(tmp_path):
    from mergekit_wudi.mudsc import mudsc_merge

    experts = []
    for task in range(2):  # different inits, different tasks, no shared base
        expert = TinyModel(seed=10 + task)
        make_trainer(tmp_path, []).fit(expert, task_loader(task))
        experts.append(str(tmp_path / f"expert{task}.safetensors"))
        save_safetensors_atomic(expert.state_dict(), experts[-1])
    params = {"mode": "align", "alpha": 0.5, "max_batches": 2}
    callback = WUDIMergeCallback(method="mudsc", parameters=params, experts=experts, exclude=["head"],
                                 output=str(tmp_path / "out"))
    model = TinyModel(seed=0)
    make_trainer(tmp_path, [callback], max_steps=1).fit(model, task_loader(0))
    merged = load_state_dict(callback.merged_path)
    assert set(merged) == {n for n in model.state_dict() if not n.startswith("head")}
    # the same merge called directly, on the trainer's (unlabeled) train data
    models = []
    for path in experts:
        m = TinyModel()
        m.load_state_dict(load_state_dict(path))
        models.append(m)
    direct_model, info = mudsc_merge(models, task_loader(0), **params, return_info=True)
    direct = direct_model.state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, direct[name], msg=name)
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)
    # each task keeps its own head, expressed in the merged unit order (expert 1 was permuted onto expert 0)
    for task, head in enumerate(callback.task_heads):
        assert set(head) == {"head.weight", "head.bias"}
        for name, tensor in head.items():
            torch.testing.assert_close(tensor, info["aligned_states"][task][name], msg=name)
    torch.testing.assert_close(callback.task_heads[0]["head.weight"], models[0].head.weight.detach())
    assert not torch.equal(callback.task_heads[1]["head.weight"], models[1].head.weight.detach())
    # zip merges units within a model: no expert's own head fits, so keeping heads out is refused
    zipped = WUDIMergeCallback(method="mudsc", parameters={**params, "mode": "zip"}, experts=experts,
                               exclude=["head"], output=str(tmp_path / "zip"))
    with pytest.raises(ValueError, match="mode='zip' cannot keep per-task tensors out of the merge"):
        make_trainer(tmp_path, [zipped], max_steps=1).fit(TinyModel(seed=0), task_loader(0))
    assert not (tmp_path / "zip" / "merged.safetensors").exists()


def test_the_low_rank_fast_path_through_the_callback(tmp_path):
    """`rank` (issue 12) reaches the solver from the callback's parameters."""
    g = torch.Generator().manual_seed(0)
    base_path, experts = write_inputs(tmp_path, lambda state, base: {
        n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in state.items()})  # full-rank task vectors
    fast = {"solver": "spectral", "rank": 1}
    callback = WUDIMergeCallback(parameters=fast, experts=experts, base=base_path, output=str(tmp_path / "out"))
    model = TinyModel()
    make_trainer(tmp_path, [callback], max_steps=1).fit(model, task_loader(0))

    merged = load_state_dict(callback.merged_path)
    assert_same(merged, direct_merge("wudi", fast, base_path, experts, model))
    exact = direct_merge("wudi", {"solver": "spectral"}, base_path, experts, model)
    assert not torch.allclose(merged["body.0.weight"], exact["body.0.weight"], atol=1e-4)  # rank 1 was used
    assert torch.equal(merged["body.1.weight"], exact["body.1.weight"])  # not a linear weight: the base
