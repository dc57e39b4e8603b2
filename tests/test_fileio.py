"""Atomic writes: the new file replaces the old one whole, with the mode open() would give it."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from canao.fileio import atomic_save_tensors, atomic_write_text


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert os.stat(target).st_mode & 0o777 == os.stat(plain).st_mode & 0o777  # not mkstemp's 0600
    atomic_save_tensors({"w": np.arange(6, dtype=np.float32)}, tmp_path / "w.safetensors")
    assert load_file(tmp_path / "w.safetensors")["w"].tolist() == list(range(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "state.json", "w.safetensors"]  # no .tmp left


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
