"""Checking an artifact against the PyTorch model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FP32_TOLERANCE = 1e-4


def random_cases(vocab: int, max_seq: int, seed: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for seq in sorted({1, 7, max_seq // 3, max_seq}):
        ids = torch.randint(1, vocab, (1, seq), generator=gen)
        tt = (torch.arange(seq) >= seq // 2).long()[None]
        mask = torch.ones_like(ids)
        mask[0, seq - seq // 5:] = 0
        cases.append((f"random seq {seq}", ids, tt, mask))
    return cases


def squad_cases(tokenizer, squad_file: Path, max_seq: int, count: int = 4) -> list[tuple]:
    """The first questions of a SQuAD file with their contexts, truncated to max_seq tokens."""
    data = json.loads(Path(squad_file).read_text())["data"]
    cases = []
    for article in data:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                enc = tokenizer.encode(qa["question"], para["context"])
                ids = torch.tensor(enc.ids[:max_seq])[None]
                tt = torch.tensor(enc.type_ids[:max_seq])[None]
                cases.append((f"squad {qa['id']}", ids, tt, torch.ones_like(ids)))
                if len(cases) == count:
                    return cases
                break
    return cases


def verify(model, compiled, cases: list[tuple], tolerance: float = FP32_TOLERANCE) -> dict:
    results = []
    for name, ids, tt, mask in cases:
        with torch.no_grad():
            want = model(ids, tt, mask)
        got = compiled.run(ids, tt, mask)
        err = max((torch.as_tensor(g) - w).abs().max().item() for g, w in zip(got, want))
        results.append({"case": name, "seq": ids.shape[1], "max_abs_err": err})
    worst = max(r["max_abs_err"] for r in results)
    return {"ok": worst <= tolerance, "tolerance": tolerance, "max_abs_err": worst, "cases": results}


# bf16 and int8 artifacts are checked by what they answer: SQuAD F1 on a fixed slice of dev
# questions (the first F1_QUESTIONS, windows of max_seq tokens) may drop at most this much
# below the fp32 PyTorch model's F1 on the same slice. A higher F1 passes (one-sided).
F1_TOLERANCE = {"bf16": 0.3, "int8": 0.5}
F1_QUESTIONS = 300


def f1_verdict(reference: dict, got: dict, precision: str, questions: int) -> dict:
    """The rule for a bf16 / int8 artifact, given SQuAD metrics ({"f1", "em"}) of the fp32 PyTorch model
    (reference) and of the artifact (got) on the same questions (the command scores them: canao.tasks)."""
    tol = F1_TOLERANCE[precision]
    return {"ok": got["f1"] >= reference["f1"] - tol, "precision": precision, "questions": questions,
            "f1_fp32": reference["f1"], "f1": got["f1"], "em_fp32": reference["em"], "em": got["em"],
            "f1_delta": got["f1"] - reference["f1"], "tolerance": tol, "rule": "f1 >= f1_fp32 - tolerance"}
