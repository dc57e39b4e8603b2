"""The code generator's plan (codegen.plan), before any C: kernels, phases, live ranges, arena."""

import pytest

from canao.compiler.codegen.c import plan_program
from canao.compiler.frontend import capture
from canao.compiler.passes import optimize
from canao.compiler.targets import TARGETS


@pytest.fixture(scope="module")
def teacher_graph(teacher):
    graph, _ = optimize(capture(teacher[0], 384), 384)
    return graph


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_plan_of_the_teacher(teacher_graph, precision):
    plan = plan_program(teacher_graph, TARGETS["avx2"], 384, precision)
    kernels = plan.kernels
    # the 45 fused kernels (mask, embeddings, per layer QKV, attention, output projection, its LayerNorm, FFN
    # up, FFN down, its LayerNorm, then the QA head) and a K/V packing per layer; a phase per attention + 1
    assert len(kernels) == 51 and sum(kn.kind == "pack_kt" for kn in kernels) == 6 and plan.phases == 7
    assert [kn.phase for kn in kernels] == sorted(kn.phase for kn in kernels)
    # a phase boundary before every attention: it reads every key the last phase's blocks packed
    for kn in kernels:
        if kn.kind == "attention":
            pack = next(p for p in kernels if p.kind == "pack_kt" and p.op is kn.op)
            assert pack.phase < kn.phase
    # buffers alive in a common phase never share arena bytes (blocks of a phase run in any order)
    placed = {b: (plan.arena.offsets[b], plan.arena.offsets[b] + plan.sizes[b]) for b in plan.live}
    for a in plan.live:
        for b in plan.live:
            (fa, la), (fb, lb) = plan.live[a], plan.live[b]
            if a < b and not (la < fb or lb < fa):
                assert placed[a][1] <= placed[b][0] or placed[b][1] <= placed[a][0], (a, b)
    assert max(end for _, end in placed.values()) <= plan.arena.peak_bytes
    assert 0 < plan.arena.peak_bytes < plan.arena.naive_bytes
    text = plan.describe()
    assert text.splitlines()[0] == f"51 kernels in 7 phases, arena peak {plan.arena.peak_bytes} bytes"
    assert len(text.splitlines()) == 52 and "k000_" in text
