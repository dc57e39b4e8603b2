import json
import shutil
from pathlib import Path

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
    from canao.compiler.encoder_runtime import CompiledModel

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


# ---- an artifact is code: what loading it checks (issue 16)
def test_token_and_type_ids_outside_the_tables_are_refused(compiled):
    import numpy as np

    ok = np.ones((1, 8), np.int64)
    for ids, tt, words in ((ok * 100, ok * 0, "token id 100 .* vocabulary 0..99"), (ok * -1, ok * 0, "token id -1"),
                           (ok, ok * 2, "token type id 2 .* outside 0..1")):
        with pytest.raises(CanaoError, match=words):
            compiled.run(ids, tt, ok)
    assert np.isfinite(compiled.run(ok * 99, ok, ok)[0]).all()  # the last row of each table is still fine


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_a_manifest_without_checksums_or_with_a_file_left_out_is_refused(copy):
    from canao.compiler.artifact import LIBRARY

    m = _manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "checksums"}))
    with pytest.raises(CanaoError, match="no checksums"):
        load_artifact(copy)
    del m["checksums"][LIBRARY]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CanaoError, match=f"{LIBRARY} not covered by the manifest"):
        load_artifact(copy)


def test_a_file_added_after_the_build_is_refused_and_add_files_checksums_it(copy):
    from canao.compiler.artifact import add_files

    (copy / "extra.txt").write_text("hello")
    with pytest.raises(CanaoError, match="extra.txt not covered"):
        load_artifact(copy)
    (copy / "extra.txt").unlink()
    src = copy.parent / "vocab.txt"
    src.write_text("[PAD]\nhello\n")
    add_files(copy, {"vocab.txt": src})
    load_artifact(copy).close()
    (copy / "vocab.txt").write_text("[PAD]\nhullo\n")  # a tokenizer swapped after the build
    with pytest.raises(CanaoError, match="vocab.txt does not match its checksum"):
        load_artifact(copy)


def test_recompiling_into_the_same_folder_loads_the_new_code(tmp_path):
    import torch
    from compiler_helpers import random_inputs, small_model

    from canao.compiler import compile_model

    out = tmp_path / "art"
    ids, tt, mask = random_inputs(16)
    for heads, ffn in (((2, 3), (96, 50)), ((3, 1), (40, 70))):  # another shape: another library
        model = small_model(heads=heads, ffn=ffn, seed=len(ffn) + heads[0])
        compile_model(model, out, max_seq=64, tune=False)
        compiled = load_artifact(out, threads=1)
        with torch.no_grad():
            want = model(ids, tt, mask)
        got = compiled.run(ids, tt, mask)
        compiled.close()
        assert max(float((g - w).abs().max()) for g, w in zip(got, want)) < 1e-4


def test_the_build_cache_holds_whole_files_or_none(tmp_path, monkeypatch):
    from canao.compiler import build

    monkeypatch.setattr(build, "cache_dir", lambda: tmp_path)
    src = tmp_path / "in.c"
    src.write_text("int x;")

    def crash(out):
        out.write_bytes(b"\x7fELF truncated")
        raise KeyboardInterrupt  # stopped in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        build._cached("lib", "cc", [], [src], ".so", crash)
    assert list((tmp_path / "build").iterdir()) == []  # nothing that a later build would trust
    moves = []
    real = build.os.replace
    monkeypatch.setattr(build.os, "replace", lambda a, b: (moves.append((a, b)), real(a, b)))
    path = build._cached("lib", "cc", [], [src], ".so", lambda out: out.write_bytes(b"whole"))
    assert path.read_bytes() == b"whole" and len(moves) == 1
    assert Path(moves[0][0]).parent.parent == path.parent  # renamed within one filesystem, not copied


@pytest.fixture(scope="module")
def fat_artifact(tmp_path_factory):
    """One x86-64 artifact with a build per x86 target (fp32, so every build can be held to 1e-4)."""
    from canao.compiler import compile_model
    from compiler_helpers import small_model

    out = tmp_path_factory.mktemp("fat") / "model.art"
    summary = compile_model(small_model(), out, max_seq=48, target="x86-64", tune=False)
    return out, summary


def _parity(folder, model, **kw):
    import torch

    from compiler_helpers import random_inputs

    cm = load_artifact(folder, threads=2, **kw)
    ids, tt, mask = random_inputs(30, pad=3, seed=4)
    with torch.no_grad():
        want = model(ids, tt, mask)
    err = max((torch.as_tensor(a) - b).abs().max().item() for a, b in zip(cm.run(ids, tt, mask), want))
    name = cm.manifest["target"]["name"]
    cm.close()
    return name, err


def test_an_x86_64_artifact_runs_the_widest_build_this_cpu_has_and_any_other_on_request(fat_artifact, monkeypatch):
    """Runtime dispatch: the artifact carries AVX2, AVX-512 and AVX-512 VNNI builds; loading picks the first
    the CPU runs (whichever that is on this host), and CANAO_X86_VARIANT runs any other the CPU supports."""
    from canao.compiler.targets import X86_VARIANTS, host_target
    from compiler_helpers import small_model

    folder, summary = fat_artifact
    top = json.loads((folder / "manifest.json").read_text())
    assert top["target"]["variants"] == list(X86_VARIANTS) and sorted(summary["builds"]) == sorted(X86_VARIANTS)
    assert {p.name for p in folder.iterdir()} == {"manifest.json", *X86_VARIANTS}
    model = small_model()
    runnable = [v for v in X86_VARIANTS if not missing_features(TARGETS[v])]
    picked, err = _parity(folder, model)
    assert picked == runnable[0] == host_target().name and err < 1e-4
    for name in X86_VARIANTS:
        monkeypatch.setenv("CANAO_X86_VARIANT", name)
        if name in runnable:
            picked, err = _parity(folder, model)
            assert picked == name and err < 1e-4
        else:  # only on a host without AVX-512: the build is there but this CPU cannot run it
            with pytest.raises(CanaoError, match=f"CANAO_X86_VARIANT={name}: this CPU lacks"):
                load_artifact(folder)
    print(f"x86-64 artifact: ran {', '.join(runnable)}; this CPU cannot run "
          f"{', '.join(sorted(set(X86_VARIANTS) - set(runnable))) or 'none'}")
    monkeypatch.setenv("CANAO_X86_VARIANT", "sse2")
    with pytest.raises(CanaoError, match="has builds for avx512_vnni, avx512, avx2"):
        load_artifact(folder)


def test_a_changed_build_of_an_x86_64_artifact_is_refused(fat_artifact, tmp_path):
    from canao.compiler.targets import host_target

    folder = tmp_path / "fat.art"
    shutil.copytree(fat_artifact[0], folder)
    build = folder / host_target().name
    weights = build / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\1\2\3\4")
    with pytest.raises(CanaoError, match="weights.bin does not match its checksum"):
        load_artifact(folder)
    # a build whose manifest was rewritten to bless the change: the top manifest's checksum catches it
    manifest = json.loads((build / "manifest.json").read_text())
    from canao.compiler.artifact import sha256

    manifest["checksums"]["weights.bin"] = sha256(weights)
    (build / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CanaoError, match=f"{host_target().name}/manifest.json does not match its checksum"):
        load_artifact(folder)
    shutil.rmtree(build)
    with pytest.raises(CanaoError, match="missing"):
        load_artifact(folder)
