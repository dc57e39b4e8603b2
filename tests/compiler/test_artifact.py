import json
import shutil

import pytest

from canao.compiler import load_artifact
from canao.compiler.codegen.memory import plan_arena
from canao.compiler.targets import TARGETS, is_cross, missing_features
from canao.errors import CanaoError


@pytest.fixture
def copy(artifact_dir, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(artifact_dir, dest)
    return dest


def test_corrupted_weights_are_refused(copy):
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02")
    with pytest.raises(CanaoError, match="weights.bin does not match its checksum"):
        load_artifact(copy)


def test_truncated_weights_are_refused_by_the_library_too(copy):
    with open(copy / "weights.bin", "r+b") as f:
        f.truncate(1000)
    from canao.compiler.runtime import CompiledModel

    with pytest.raises(CanaoError, match="expects"):
        CompiledModel(copy, check=False)  # the C loader checks the size itself


def test_missing_manifest_is_not_an_artifact(copy):
    (copy / "manifest.json").unlink()
    with pytest.raises(CanaoError, match="not a canao artifact"):
        load_artifact(copy)


def test_artifact_for_another_isa_is_refused(copy, monkeypatch):
    if not [t for t in TARGETS.values() if missing_features(t) and not is_cross(t)]:
        # this CPU runs every x86 target: check the refusal as an AVX2-only CPU would make it
        import canao.compiler.targets as targets

        monkeypatch.setattr(targets, "cpu_flags", lambda: {"avx2", "fma", "sse4_2"})
    foreign = [name for name, t in TARGETS.items() if missing_features(t) and not is_cross(t)]  # same arch, other ISA
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["name"] = foreign[0]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CanaoError, match=f"built for {foreign[0]}.*lacks"):
        load_artifact(copy)


def test_arena_reuses_dead_buffers():
    sizes = {"a": 1000, "b": 1000, "c": 1000}
    live = {"a": (0, 1), "b": (1, 2), "c": (2, 3)}  # a is dead when c is written
    plan = plan_arena(sizes, live)
    assert plan.offsets["a"] == plan.offsets["c"] != plan.offsets["b"]
    assert plan.peak_bytes == 2 * 1024 and plan.naive_bytes == 3 * 1024
