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


def _command(config, out, where, extra=()):
    cfg = Path(where) / f"cfg-{hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]}.yml"
    cfg.write_text(yaml.safe_dump(config))
    return [mergekit_yaml_executable(), str(cfg), str(out), "--no-copy-tokenizer", "--quiet", *extra]


def _run(config, out, where, cwd=None, extra=()):
    return subprocess.run(_command(config, out, where, extra), capture_output=True, text=True, cwd=cwd,
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


def _own_staging(out: Path, suffix: str, new_files: dict, journal) -> Path:
    """A dead staging folder as a killed run of ours leaves it (mode 0700, free lock), in ``out``."""
    staging = out / (output.STAGING_PREFIX + suffix)
    (staging / "new").mkdir(parents=True)
    staging.chmod(0o700)
    (staging / "lock").write_text("")
    for name, data in new_files.items():
        (staging / "new" / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / "new" / name).write_bytes(data)
    if journal is not None:
        (staging / "commit.json").write_bytes(journal if isinstance(journal, bytes) else json.dumps(journal).encode())
    return staging


def _commit_files(out, files: dict) -> None:
    """What a merge does to OUT, without a model: ``files`` written in the staging folder and committed."""
    with output.staged_output(out) as folder:
        for name, data in files.items():
            (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / name).write_bytes(data)


def _merge_in_process(config, out, **options):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(copy_tokenizer=False, quiet=True, **options))


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
    project.mkdir()
    (project / "README.txt").write_text("my project")
    (project / "data").mkdir()
    (project / "data" / "train.jsonl").write_text("{}")
    before = snapshot(project)
    done = _run(_config(llama_family), ".", tmp_path, cwd=project)
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
    dead = _own_staging(out, "deadbeef", {"model-00001-of-00002.safetensors": b"partial"}, journal=None)
    live = _own_staging(out, "livelive", {}, journal=None)
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
    (out / "a.txt").write_text("new a")  # killed after the first rename
    (out / "b.txt").write_text("old b")
    staging = _own_staging(out, "abcdefgh", {"b.txt": b"new b"}, journal={"version": 2, "files": ["a.txt", "b.txt"], "remove": []})
    done = output.recover(out)
    assert any("completed the interrupted commit" in line for line in done)
    assert (out / "a.txt").read_text() == "new a" and (out / "b.txt").read_text() == "new b"
    assert not staging.exists() and staging_leftovers(out) == []


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
# Recovery trusts nothing it did not make (issue 20, must-fix 1 and 2)


@pytest.fixture
def victim(tmp_path):
    """Another user's file that a planted journal tries to replace or move."""
    keys = tmp_path / "victim" / ".ssh" / "authorized_keys"
    keys.parent.mkdir(parents=True)
    keys.write_text("victim's key\n")
    return keys


def _untouched(victim) -> bool:
    return sorted(p.name for p in victim.parent.iterdir()) == ["authorized_keys"] and victim.read_text() == "victim's key\n"


def _plant_old_attack(folder: Path, name: str, victim: Path) -> Path:
    """The journal of issue 20: it names the victim's folder and carries a payload for it."""
    planted = folder / name
    (planted / "payload" / victim.parent.name).mkdir(parents=True)
    (planted / "payload" / victim.parent.name / victim.name).write_text("attacker's key\n")
    (planted / "lock").write_text("")
    (planted / "commit.json").write_text(json.dumps({"out": str(victim.parent), "files": [victim.name]}))
    return planted


def test_planted_staging_folders_beside_out_are_ignored(llama_family, tmp_path, victim):
    shared = tmp_path / "shared"  # e.g. /tmp: anyone can write here
    shared.mkdir()
    generic = _plant_old_attack(shared, output.STAGING_PREFIX + "evil", victim)  # the exact attack of issue 20
    foreign = _plant_old_attack(shared, output.STAGING_PREFIX + "anything-abcdefgh", victim)
    os.chown(foreign, 4242, 4242) if os.geteuid() == 0 else foreign.chmod(0o755)  # another user's folder
    loose = _plant_old_attack(shared, output.STAGING_PREFIX + "anything-zzzzzzzz", victim)
    loose.chmod(0o755)  # what an attacker's mkdir makes (and we cannot chown without root)
    link = shared / (output.STAGING_PREFIX + "anything-linklink")
    link.symlink_to(victim.parent)
    done = _run(_config(llama_family), shared / "anything", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _untouched(victim)
    assert (shared / "anything" / "model.safetensors").exists()
    for name in (foreign, loose, link):
        assert f"ignored {name}" in done.stderr
    assert generic.exists() and foreign.exists() and loose.exists() and link.is_symlink()  # not ours: left alone


@pytest.mark.parametrize("layout", ["payload folder links to the victim (old layout)", "new/ links to the victim",
                                    "a new file links to the victim's", "a folder in OUT links to the victim",
                                    "the staging folder is a link"])
def test_a_journal_with_a_symlink_is_never_replayed(tmp_path, victim, layout, caplog):
    out = tmp_path / "out"
    _commit_files(out, {"config.json": b"old"})
    journal = {"version": 2, "files": [victim.name], "remove": []}
    if layout.startswith("payload"):
        staging = _own_staging(out, "abcdefgh", {}, journal={"out": str(out), "files": [victim.name]})
        (staging / "payload").mkdir()
        (staging / "payload" / out.name).symlink_to(victim.parent)
    elif layout.startswith("new/"):
        staging = _own_staging(out, "abcdefgh", {}, journal=journal)
        (staging / "new").rmdir()
        (staging / "new").symlink_to(victim.parent)
    elif layout.startswith("a new file"):
        staging = _own_staging(out, "abcdefgh", {}, journal=journal)
        (staging / "new" / victim.name).symlink_to(victim)
    elif layout.startswith("a folder in OUT"):
        staging = _own_staging(out, "abcdefgh", {"ssh/" + victim.name: b"attacker's key\n"},
                               journal={"version": 2, "files": ["ssh/" + victim.name], "remove": []})
        (out / "ssh").symlink_to(victim.parent)
    else:
        elsewhere = _own_staging(tmp_path, "elsewhere", {victim.name: b"attacker's key\n"}, journal=journal)
        staging = out / (output.STAGING_PREFIX + "abcdefgh")
        staging.symlink_to(elsewhere)
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"config.json": b"new"})
    assert _untouched(victim)
    assert (out / "config.json").read_bytes() == b"new"  # the merge went through
    assert str(staging) in caplog.text and "ignored" in caplog.text
    assert not (out / victim.name).exists()


@pytest.mark.parametrize("files", [["../victim/.ssh/authorized_keys"], ["ABSOLUTE"], ["./authorized_keys"]])
def test_a_journal_naming_another_folder_is_set_aside(tmp_path, victim, files, caplog):
    out = tmp_path / "out"
    _commit_files(out, {"config.json": b"old"})
    files = [str(victim) if f == "ABSOLUTE" else f for f in files]
    staging = _own_staging(out, "abcdefgh", {"authorized_keys": b"attacker's key\n"},
                           journal={"version": 2, "files": files, "remove": []})
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"config.json": b"new"})
    assert _untouched(victim) and (out / "config.json").read_bytes() == b"new"
    assert f"ignored the journal of {staging}" in caplog.text and "only plain relative names" in caplog.text
    assert not staging.exists() and (out / (output.REJECTED_PREFIX + "abcdefgh")).is_dir()


def test_an_old_format_journal_naming_another_folder_is_set_aside_by_a_real_merge(llama_family, tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    planted = _plant_old_attack(out, output.STAGING_PREFIX + "abcdefgh", victim)
    planted.chmod(0o700)  # even a folder that passes the ownership checks
    done = _run(_config(llama_family), out, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _untouched(victim) and (out / "model.safetensors").exists()
    assert f"ignored the journal of {planted}" in done.stderr and "never names its target folder" in done.stderr


@pytest.mark.parametrize("journal", [b"{not json", b"", b"\xff\xfe", {"version": 2, "remove": []},
                                     {"out": None, "files": []}, {"version": 2, "files": "config.json", "remove": []},
                                     {"version": 2, "files": [1], "remove": []}, [], b"null"])
def test_a_corrupt_journal_is_set_aside_and_the_merge_proceeds(tmp_path, journal, caplog):
    out = tmp_path / "out"
    _commit_files(out, {"config.json": b"old", "model.safetensors": b"old weights"})
    staging = _own_staging(out, "abcdefgh", {"config.json": b"half"}, journal=journal if journal != [] else b"[]")
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"config.json": b"new", "model.safetensors": b"new weights"})
    assert (out / "config.json").read_bytes() == b"new" and (out / "model.safetensors").read_bytes() == b"new weights"
    assert f"ignored the journal of {staging}" in caplog.text
    aside = out / (output.REJECTED_PREFIX + "abcdefgh")
    assert not staging.exists() and (aside / "new" / "config.json").read_bytes() == b"half"  # kept, never replayed
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"config.json": b"newer"})
    assert "ignored" not in caplog.text  # set aside once, not reported again


def test_a_foreign_staging_folder_in_out_is_named_and_left_alone(tmp_path, caplog):
    out = tmp_path / "out"
    _commit_files(out, {"config.json": b"old"})
    staging = _own_staging(out, "abcdefgh", {"config.json": b"planted"},
                           journal={"version": 2, "files": ["config.json"], "remove": []})
    staging.chmod(0o755)
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"config.json": b"new"})
    assert (out / "config.json").read_bytes() == b"new" and staging.exists()
    assert f"ignored {staging}: its mode is 0o755" in caplog.text


# ---------------------------------------------------------------------------------------------
# The output path (must-fix 3 and 4)


def test_an_empty_output_path_is_an_error_and_the_current_folder_is_untouched(llama_family, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my project")
    monkeypatch.chdir(project)
    with pytest.raises(output.OutputPathError, match="output path is empty"):
        _merge_in_process(_config(llama_family), "")
    assert sorted(p.name for p in project.iterdir()) == ["README.md"]
    done = _run(_config(llama_family), "", tmp_path, cwd=project)  # mergekit-yaml cfg.yml "$UNSET"
    assert done.returncode != 0 and "output path is empty" in done.stderr
    assert sorted(p.name for p in project.iterdir()) == ["README.md"]


def _no_loading(monkeypatch):
    from mergekit.io.tasks import LoaderCache

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(LoaderCache, "get", refuse)


@pytest.mark.parametrize("case", ["OUT is the base", "OUT inside an expert", "OUT contains the models", "relative ./base",
                                  "tokenizer_source", "slices", "LoRA adapter"])
def test_output_that_is_an_input_model_is_refused_before_anything_is_read(llama_family, tmp_path, monkeypatch, case):
    _no_loading(monkeypatch)
    base, e1, e2, e3 = llama_family
    config, named = _config(llama_family), None
    if case == "OUT is the base":
        out, named = base, "base_model"
    elif case == "OUT inside an expert":
        out, named = e2 / "merged", "models[1].model"
    elif case == "OUT contains the models":
        out = base.parent
    elif case == "relative ./base":
        monkeypatch.chdir(base.parent)
        out, named = Path("./" + base.name), "base_model"
    elif case == "tokenizer_source":
        config["models"] = [{"model": str(e1)}, {"model": str(e2)}]
        config["tokenizer_source"] = str(e3)
        out, named = e3, "tokenizer_source"
    elif case == "slices":
        layers = [0, 2]
        config.pop("models")
        config["slices"] = [{"sources": [{"model": str(m), "layer_range": layers} for m in (base, e1, e2)]}]
        out, named = e1, "slices[0].sources[1].model"
    else:
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        config["models"] = [{"model": f"{e1}+{adapter}"}]
        out, named = adapter, "(LoRA adapter)"
    before = snapshot(base.parent)
    with pytest.raises(output.OutputPathError, match="the merge would overwrite or mix with an input model") as error:
        _merge_in_process(config, out)
    assert (named or "") in str(error.value)
    assert snapshot(base.parent) == before and not (e2 / "merged").exists()


def test_a_hub_model_name_is_not_taken_for_a_folder(tmp_path, monkeypatch):
    from mergekit.config import MergeConfiguration

    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    config = MergeConfiguration.model_validate(
        {"merge_method": "wudi", "base_model": "org/base-model", "models": [{"model": "org/expert"}]})
    output.check_output_path(config, tmp_path / "org")  # "org/base-model" is no local folder: no error


# ---------------------------------------------------------------------------------------------
# Commit (weak spots of issue 20's "Output" bullet)


def test_replacing_files_no_merge_of_ours_wrote_is_named(llama_family, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my project\n")
    (out / "config.json").write_text("{}")
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _merge_in_process(_config(llama_family), out)
    assert "files this merge replaces that no earlier mergekit-wudi merge wrote there: README.md, config.json" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _merge_in_process(_config(llama_family, solver="spectral"), out)
    assert "no earlier mergekit-wudi merge wrote" not in caplog.text  # these are ours now (manifest)


def test_weight_files_of_our_earlier_merge_are_removed_when_the_sharding_changes(llama_family, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    out, single = tmp_path / "out", tmp_path / "single"
    _merge_in_process(_config(llama_family), out, out_shard_size=8000)
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("model"))
    assert "model.safetensors.index.json" in shards and len(shards) > 2
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _merge_in_process(_config(llama_family, solver="spectral"), out)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model")) == ["model.safetensors"]
    assert "weight files this merge did not write" not in caplog.text
    _merge_in_process(_config(llama_family, solver="spectral"), single)
    assert (out / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()
    _merge_in_process(_config(llama_family), out, out_shard_size=8000)  # and back: the single file goes
    assert "model.safetensors" not in {p.name for p in out.iterdir()}
    AutoModelForCausalLM.from_pretrained(out)  # loads the shards


def test_a_second_commit_into_out_waits_for_the_first(tmp_path):
    import threading

    out = tmp_path / "out"
    _commit_files(out, {"a.bin": b"first", "b.bin": b"first"})
    result = []
    with output.commit_lock(out):  # a commit in progress (another process would hold this lock)
        worker = threading.Thread(target=lambda: result.append(_commit_files(out, {"a.bin": b"second", "b.bin": b"second"})))
        worker.start()
        worker.join(1.5)
        assert worker.is_alive() and (out / "a.bin").read_bytes() == b"first"
    worker.join(10)
    assert result == [None] and (out / "a.bin").read_bytes() == (out / "b.bin").read_bytes() == b"second"


@pytest.mark.parametrize("failure", ["once", "also while undoing"])
def test_a_failure_during_the_renames_puts_every_file_back(tmp_path, monkeypatch, failure, caplog):
    out = tmp_path / "out"
    _commit_files(out, {"config.json": b"old", "model-00001-of-00002.safetensors": b"s1",
                        "model-00002-of-00002.safetensors": b"s2", "model.safetensors.index.json": b"{}"})
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    real_replace, renames = os.replace, []

    def failing_replace(source, target):
        if Path(target).parent == out:
            renames.append(Path(target).name)
            if len(renames) == 3 or (failure != "once" and len(renames) > 3):  # the third rename of the commit on
                raise OSError(28, "No space left on device (injected)")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    new = {"config.json": b"new", "model.safetensors": b"new weights", "README.md": b"card"}
    with pytest.raises(OSError, match="injected"):
        _commit_files(out, new)
    monkeypatch.setattr(os, "replace", real_replace)
    if failure == "once":
        after = snapshot(out)
        assert after.pop(output.COMMIT_LOCK) == hashlib.sha256(b"").hexdigest()  # the one trace: an empty lock file
        assert renames[:3] == ["README.md", "config.json", "model.safetensors"] and after == before
        assert staging_leftovers(out) == []
        return
    # the undo failed too: the journal stays, the error says so, and the next run completes the commit
    assert "failed and could not be undone; its journal stays in" in caplog.text
    output.recover(out)
    assert {name: (out / name).read_bytes() for name in new} == new and (out / "notes.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith("model-")] and staging_leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# Fault injection: a real merge killed at many points of its life.


def _state(out: Path, previous: dict, new: dict) -> str:
    files = {k: v for k, v in snapshot(out).items() if not k.startswith(".") and k != "notes.txt"}
    if files == previous:
        return "previous"
    if files == new:
        return "new"
    return "mix"


KILLER = """
import os, signal, sys
from pathlib import Path

out, after, mode = os.path.realpath(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
real_replace, renames = os.replace, [0]


def replace(source, target, **kwargs):  # SIGKILL before the rename number `after` into OUT
    if os.path.dirname(os.path.realpath(target)) == out:
        if renames[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)
        renames[0] += 1
    return real_replace(source, target, **kwargs)


os.replace = replace
if mode == "recover":
    from mergekit_wudi import output
    output.recover(out)
else:
    from mergekit.scripts.run_yaml import main
    sys.argv = ["mergekit-yaml", *sys.argv[4:]]
    main()
"""


@pytest.mark.slow
def test_kill_at_many_points_leaves_previous_or_new_model(llama_family, tmp_path):
    """SIGKILL/SIGTERM/SIGINT at random points of a merge, then SIGKILL between chosen renames of the
    commit and of the recovery that follows, then a merge of a different config (other sharding) into
    the same OUT. OUT is always the previous or a new model once recovered; nothing beside OUT changes."""
    parent = tmp_path / "parent"
    out, reference = parent / "out", tmp_path / "reference"
    (parent / "victim").mkdir(parents=True)
    (parent / "victim" / "data.txt").write_text("a sibling folder")

    def outside() -> dict:
        return {k: v for k, v in snapshot(parent).items() if not k.startswith("out/")}

    previous_config = _config(llama_family, solver="closed_form")
    new_config = _config(llama_family, solver="adam", iterations=300)
    assert _run(previous_config, out, tmp_path).returncode == 0
    (out / "notes.txt").write_text("mine")
    beside = outside()
    previous = {k: v for k, v in snapshot(out).items() if k != "notes.txt" and not k.startswith(".")}
    saved = tmp_path / "saved-previous"
    shutil.copytree(out, saved)
    start = time.perf_counter()
    assert _run(new_config, reference, tmp_path).returncode == 0
    duration = time.perf_counter() - start
    # the new model's files under OUT's name (the model card names the folder): merge into a twin folder
    twin = tmp_path / "twin" / "out"
    assert _run(new_config, twin, tmp_path).returncode == 0
    new = {k: v for k, v in snapshot(twin).items() if not k.startswith(".")}
    assert new != previous

    def reset() -> None:  # OUT back to the previous model (as the user had it)
        shutil.rmtree(out)
        shutil.copytree(saved, out)

    points = 12  # with SIGKILL, SIGTERM and SIGINT 4 times each; the commit window has its own chosen kill points below
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
        assert (out / "notes.txt").read_text() == "mine" and outside() == beside
        if state == "new":  # start the next point from the previous model again
            reset()
    print(f"kill points: {points}, outcomes: {seen}")
    assert seen["previous"] > 0 and seen["new"] > 0, seen  # the kills did span the whole merge

    # SIGKILL before rename k of the commit, then SIGKILL during the recovery of that commit, then another
    # config with other sharding: it completes the killed commit, then replaces it whole (old weights ours: removed)
    other_config, sharded = _config(llama_family, solver="spectral"), ["--out-shard-size", "8K"]
    other_twin = tmp_path / "twin-other" / "out"
    assert _run(other_config, other_twin, tmp_path, extra=sharded).returncode == 0
    other = {k: v for k, v in snapshot(other_twin).items() if not k.startswith(".")}
    assert len([name for name in other if name.endswith(".safetensors")]) > 1
    (tmp_path / "killer.py").write_text(KILLER)
    python = str(Path(mergekit_yaml_executable()).parent / "python")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for k in (0, 1, 3):
        reset()
        killed = subprocess.run([python, str(tmp_path / "killer.py"), str(out), str(k), "merge",
                                 *_command(new_config, out, tmp_path)[1:]], capture_output=True, text=True, env=env)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert _state(out, previous, new) == ("previous" if k == 0 else "mix")
        killed = subprocess.run([python, str(tmp_path / "killer.py"), str(out), "1", "recover"],
                                capture_output=True, text=True, env=env)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert outside() == beside
        done = _run(other_config, out, tmp_path, extra=sharded)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "completed the interrupted commit" in done.stderr
        assert _state(out, previous, other) == "new", k  # exactly the other model: no file of the earlier ones left
        assert (out / "notes.txt").read_text() == "mine" and outside() == beside
        assert staging_leftovers(out) == [] and not list(out.glob(output.REJECTED_PREFIX + "*"))
    reset()
    done = _run(new_config, out, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _state(out, previous, new) == "new" and (out / "notes.txt").read_text() == "mine"
    assert staging_leftovers(out) == [] and staging_leftovers(parent) == [] and outside() == beside


# ---------------------------------------------------------------------------------------------
# Trust fixes: the manifest's file identities, user folders named like ours, unreplayable journals,
# a folder where the merge writes a file


@pytest.mark.parametrize("case", ["planted names-only manifest", "copied manifest", "user saved over our file",
                                  "manifest is a symlink"])
def test_a_weight_file_we_did_not_write_is_never_deleted(tmp_path, case, caplog):
    out = tmp_path / "out"
    if case == "planted names-only manifest":
        out.mkdir()
        (out / "user_weights.safetensors").write_bytes(b"precious")
        (out / output.MANIFEST).write_text('{"written_by":"mergekit-wudi","files":["user_weights.safetensors"]}')
    elif case == "copied manifest":
        elsewhere = tmp_path / "elsewhere"
        _commit_files(elsewhere, {"user_weights.safetensors": b"ours", "config.json": b"{}"})
        out.mkdir()
        (out / "user_weights.safetensors").write_bytes(b"precious")
        shutil.copy2(elsewhere / output.MANIFEST, out / output.MANIFEST)
    elif case == "user saved over our file":
        _commit_files(out, {"user_weights.safetensors": b"ours", "config.json": b"{}"})
        (out / "user_weights.safetensors").unlink()
        (out / "user_weights.safetensors").write_bytes(b"precious")
    else:
        _commit_files(tmp_path / "elsewhere", {"user_weights.safetensors": b"ours"})
        out.mkdir()
        (out / "user_weights.safetensors").write_bytes(b"precious")
        (out / output.MANIFEST).symlink_to(tmp_path / "elsewhere" / output.MANIFEST)
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"model.safetensors": b"new weights", "config.json": b"{}"})
    assert (out / "user_weights.safetensors").read_bytes() == b"precious"
    assert "weight files this merge did not write: user_weights.safetensors" in caplog.text


def test_our_own_unchanged_weight_file_is_still_removed(tmp_path, caplog):
    out = tmp_path / "out"
    _commit_files(out, {"model-00001-of-00002.safetensors": b"a", "model.safetensors.index.json": b"{}"})
    (out / "notes.txt").write_text("mine")
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"model.safetensors": b"new weights"})
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("model")) == ["model.safetensors"]
    assert "weight files this merge did not write" not in caplog.text


@pytest.mark.parametrize("name", [".mergekit-wudi-new-myrun001", ".mergekit-wudi-new-my-run", ".mergekit-wudi-staging-myrun001",
                                  ".mergekit-wudi-staging-results"])
def test_a_user_folder_named_like_a_staging_folder_is_left_alone(tmp_path, name, caplog):
    out = tmp_path / "out"
    _commit_files(out, {"config.json": b"old"})
    mine = out / name
    mine.mkdir()
    (mine / "lock").write_text("")  # even with a lock file like ours, the user's data says it is not ours
    (mine / "data.txt").write_text("user data")
    mine.chmod(0o700)
    os.utime(mine, (time.time() - 3600, time.time() - 3600))
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"config.json": b"new"})
    assert (mine / "data.txt").read_text() == "user data" and (out / "config.json").read_bytes() == b"new"
    assert "removed the staging folder" not in caplog.text


@pytest.mark.parametrize("case", ["files names a folder", "remove names a folder", "new entry is a folder"])
def test_a_journal_that_cannot_be_replayed_is_set_aside_and_the_merge_proceeds(tmp_path, case, caplog):
    out = tmp_path / "out"
    _commit_files(out, {"config.json": b"old", "x.txt": b"old x"})
    (out / "sub").mkdir()
    (out / "sub" / "data.txt").write_text("user data")
    journal = {"files names a folder": {"version": 2, "files": ["sub"], "remove": []},
               "remove names a folder": {"version": 2, "files": [], "remove": ["sub"]},
               "new entry is a folder": {"version": 2, "files": ["x.txt"], "remove": []}}[case]
    staging = _own_staging(out, "abcdefgh", {"sub": b"half"} if case == "files names a folder" else {}, journal=journal)
    if case == "new entry is a folder":
        (staging / "new" / "x.txt" / "inner").mkdir(parents=True)  # replay: os.replace(folder, file) fails
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"config.json": b"new"})
    assert (out / "config.json").read_bytes() == b"new" and (out / "sub" / "data.txt").read_text() == "user data"
    aside = out / (output.REJECTED_PREFIX + "abcdefgh")
    assert not staging.exists() and aside.is_dir() and str(aside) in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mergekit_wudi.output"):
        _commit_files(out, {"config.json": b"newer"})  # and later merges too
    assert (out / "config.json").read_bytes() == b"newer" and str(aside) not in caplog.text


@pytest.mark.parametrize("target", ["model.safetensors", "tokenizer/vocab.json"])
def test_a_folder_where_the_merge_writes_a_file_is_an_error_before_any_rename(tmp_path, target):
    out = tmp_path / "out"
    _commit_files(out, {"config.json": b"old", "x.txt": b"old x"})
    if "/" in target:
        (out / "tokenizer").write_text("a file where the merge needs a folder")
    else:
        (out / target / "inner").mkdir(parents=True)
    before = snapshot(out)
    with pytest.raises(output.OutputPathError, match=f"{out / target.split('/')[0]} is (a folder|not a folder)"):
        _commit_files(out, {"config.json": b"new", "x.txt": b"new x", target: b"weights"})
    after = snapshot(out)
    after.pop(output.COMMIT_LOCK)  # an empty lock file, as after any failed commit
    assert after == before and staging_leftovers(out) == []


def test_a_config_json_folder_in_out_is_an_error_before_any_tensor_is_read(llama_family, tmp_path, monkeypatch):
    _no_loading(monkeypatch)
    out = tmp_path / "out"
    (out / "config.json").mkdir(parents=True)
    with pytest.raises(output.OutputPathError, match="config.json is a folder"):
        _merge_in_process(_config(llama_family), out)
    assert os.listdir(out) == ["config.json"]
