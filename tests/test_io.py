"""Files the package writes: atomic, with the user's umask, also when the writer replaces the file."""

import os

import torch

from mergekit_wudi.io import load_state_dict, save_safetensors_atomic


def test_safetensors_files_get_the_users_umask(tmp_path):
    """safetensors' save_file replaces the temporary file, dropping its mode: the callback's base,
    expert and merged files came out 0600 under umask 022."""
    old = os.umask(0o022)
    try:
        save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert torch.equal(load_state_dict(tmp_path / "w.safetensors")["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
