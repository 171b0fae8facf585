"""What a `mergekit-yaml` merge with our methods does to its output folder (mergekit_wudi/output.py).

Every case runs a real `mergekit-yaml` subprocess on the tiny Llama family of conftest.py.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from mergekit_wudi import output
from mergekit_wudi.toy import mergekit_yaml_executable


def _config(family, **parameters):
    base, *experts = family
    return {"merge_method": "wudi", "base_model": str(base), "models": [{"model": str(e)} for e in experts],
            "parameters": parameters or {"solver": "closed_form"}, "dtype": "float32"}


def _command(config, out, where):
    cfg = Path(where) / f"cfg-{hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]}.yml"
    cfg.write_text(yaml.safe_dump(config))
    return [mergekit_yaml_executable(), str(cfg), str(out), "--no-copy-tokenizer", "--quiet"]


def _run(config, out, where, cwd=None):
    return subprocess.run(_command(config, out, where), capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder`` (staging folders included, so a leftover shows).
    mergekit's model card lists the models in set order (it varies between runs): its lines are sorted."""
    def digest(path: Path) -> str:
        data = path.read_bytes()
        if path.name == "README.md":
            data = b"".join(sorted(data.splitlines(True)))
        return hashlib.sha256(data).hexdigest()

    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def staging_leftovers(folder: Path) -> list:
    return [p.name for p in folder.iterdir() if p.name.startswith((output.STAGING_PREFIX, ".mergekit-wudi-new-"))]


def test_files_the_merge_does_not_write_are_kept(llama_family, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    done = _run(_config(llama_family), out, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert staging_leftovers(out) == [] and staging_leftovers(tmp_path) == []


def test_output_dot_keeps_the_project_folder(llama_family, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(llama_family[0].parent, project / "models")
    (project / "README.txt").write_text("my project")
    family = [project / "models" / p.name for p in llama_family]
    before = snapshot(project)
    done = _run(_config(family), ".", project, cwd=project)
    assert done.returncode == 0, done.stderr[-2000:]
    after = snapshot(project)
    assert all(after[name] == digest for name, digest in before.items())  # nothing lost or changed
    assert "model.safetensors" in after and staging_leftovers(project) == []


def test_output_that_is_a_file_is_an_error_before_any_tensor_is_read(llama_family, tmp_path, monkeypatch):
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import MergeOptions, run_merge

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LoaderCache, "get", no_loading)
    out = tmp_path / "out"
    out.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is an existing file, not a folder"):
        run_merge(MergeConfiguration.model_validate(_config(llama_family)), str(out), MergeOptions(quiet=True))
    assert out.read_text() == "not a folder"
    done = _run(_config(llama_family), out, tmp_path)  # and through the command line
    assert done.returncode != 0 and "is an existing file, not a folder" in done.stderr


def test_output_symlink_is_written_through(llama_family, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep.txt").write_text("k")
    link = tmp_path / "link"
    link.symlink_to(target)
    done = _run(_config(llama_family), link, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert link.is_symlink() and (target / "model.safetensors").exists() and (target / "keep.txt").exists()


@pytest.fixture(scope="module")
def nan_family(llama_family, tmp_path_factory):
    """The family with a NaN in one tensor of expert 1: the merge fails inside, after loading."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path_factory.mktemp("nan") / "expert_nan"
    shutil.copytree(llama_family[1], broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    return [llama_family[0], broken, *llama_family[2:]]


def test_a_failed_merge_leaves_output_exactly_as_it_was(llama_family, nan_family, tmp_path):
    out = tmp_path / "out"
    assert _run(_config(llama_family), out, tmp_path).returncode == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    done = _run(_config(nan_family), out, tmp_path)
    assert done.returncode != 0 and "non-finite values (NaN or Inf) in tensor" in done.stderr
    assert snapshot(out) == before and staging_leftovers(tmp_path) == []


def test_a_missing_output_folder_is_not_left_behind_by_a_failed_merge(nan_family, tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    done = _run(_config(nan_family), out, tmp_path)
    assert done.returncode != 0 and "non-finite values (NaN or Inf) in tensor" in done.stderr
    assert not (tmp_path / "new").exists()


def test_stale_staging_of_a_killed_run_is_cleaned_and_a_live_one_is_not(llama_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = out / (output.STAGING_PREFIX + "dead")
    (dead / "payload" / "out").mkdir(parents=True)
    (dead / "payload" / "out" / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    (dead / "lock").write_text("")
    live = out / (output.STAGING_PREFIX + "live")
    live.mkdir()
    holder = subprocess.Popen(["python3", "-c", "import fcntl,sys,time\nf=open(sys.argv[1],'w')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)",
                               str(live / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = _run(_config(llama_family), out, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert not dead.exists() and live.exists()
        assert "removed the staging folder of a killed run" in done.stderr
    finally:
        holder.kill()
        holder.wait()


def test_an_interrupted_commit_is_completed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "b.txt").write_text("old b")
    staging, lock = output._locked_staging(out)
    payload = staging / "payload" / "out"
    payload.mkdir(parents=True)
    (payload / "a.txt").write_text("new a")
    (payload / "b.txt").write_text("new b")
    (staging / "commit.json").write_text(json.dumps({"out": str(out), "files": ["a.txt", "b.txt"]}))
    os.replace(payload / "a.txt", out / "a.txt")  # killed after the first rename
    lock.close()
    done = output.recover(out)
    assert any("completed the interrupted commit" in line for line in done)
    assert (out / "a.txt").read_text() == "new a" and (out / "b.txt").read_text() == "new b"
    assert staging_leftovers(out) == []


def test_weight_files_of_an_earlier_merge_are_kept_and_named(llama_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    done = _run(_config(llama_family), out, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "model-00001-of-00002.safetensors").read_bytes() == b"old shard"
    assert "weight files this merge did not write: model-00001-of-00002.safetensors" in done.stderr


def test_mergekit_methods_do_not_go_through_the_wrapper(llama_family, tmp_path, monkeypatch):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    def refuse(*args, **kwargs):
        raise AssertionError("staged_output used for a mergekit method")

    monkeypatch.setattr(output, "staged_output", refuse)
    config = _config(llama_family)
    config["merge_method"], config["parameters"] = "linear", {"weight": 1.0}
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "o"), MergeOptions(copy_tokenizer=False, quiet=True))
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_atomic_files_get_the_users_umask(tmp_path):
    from mergekit_wudi.io import atomic_file

    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f.json") as tmp:
            Path(tmp).write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# Fault injection: a real merge killed at many points of its life.


def _state(out: Path, previous: dict, new: dict) -> str:
    files = {k: v for k, v in snapshot(out).items() if not k.startswith(".") and k != "notes.txt"}
    if files == previous:
        return "previous"
    if files == new:
        return "new"
    return "mix"


@pytest.mark.slow
def test_kill_at_many_points_leaves_previous_or_new_model(llama_family, tmp_path):
    out, reference = tmp_path / "out", tmp_path / "reference"
    previous_config = _config(llama_family, solver="closed_form")
    new_config = _config(llama_family, solver="adam", iterations=300)
    assert _run(previous_config, out, tmp_path).returncode == 0
    (out / "notes.txt").write_text("mine")
    previous = {k: v for k, v in snapshot(out).items() if k != "notes.txt"}
    saved = tmp_path / "saved-previous"
    shutil.copytree(out, saved)
    start = time.perf_counter()
    assert _run(new_config, reference, tmp_path).returncode == 0
    duration = time.perf_counter() - start
    # the new model's files under OUT's name (the model card names the folder): merge into a twin folder
    twin = tmp_path / "twin" / "out"
    assert _run(new_config, twin, tmp_path).returncode == 0
    new = snapshot(twin)
    assert new != previous

    points = 24
    seen = {"previous": 0, "new": 0, "completed": 0}
    command = _command(new_config, out, tmp_path)
    for k in range(points):
        delay = duration * (0.05 + 1.1 * k / (points - 1))
        sig = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)[k % 3]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        time.sleep(delay)
        process.send_signal(sig)
        process.wait()
        state = _state(out, previous, new)
        if state == "mix":  # only a SIGKILL between the commit's renames; its journal lets the next run finish it
            files = {k: v for k, v in snapshot(out).items() if k != "notes.txt"}
            detail = {k: ("previous" if previous.get(k) == v else "new" if new.get(k) == v else "other") for k, v in files.items()}
            assert sig == signal.SIGKILL and any((p / "commit.json").exists() for p in out.glob(output.STAGING_PREFIX + "*")), (
                k, detail)
            output.recover(out)
            state = _state(out, previous, new)
            assert state == "new"
            seen["completed"] += 1
        seen[state] += 1
        assert (out / "notes.txt").read_text() == "mine"
        if state == "new":  # start the next point from the previous model again
            for name in new:
                (out / name).unlink()
            for name in previous:
                shutil.copy2(saved / name, out / name)
    print(f"kill points: {points}, outcomes: {seen}")
    assert seen["previous"] > 0 and seen["new"] > 0, seen  # the kills did span the whole merge
    done = _run(new_config, out, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _state(out, previous, new) == "new" and (out / "notes.txt").read_text() == "mine"
    assert staging_leftovers(out) == [] and staging_leftovers(tmp_path) == []


