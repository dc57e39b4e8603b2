"""Shared fixtures: the real data folder and the reference QA teacher."""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CANAO_DATA", ROOT.parent / "shared" / "data"))
TEACHER = Path(os.environ.get("CANAO_TEACHER", ROOT.parent / "shared" / "models" / "minilm-l6-h384-squad"))

# Two cores: one thread per test process keeps timings stable and parity exact.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA.exists(), f"data folder {DATA} missing: set CANAO_DATA"
    return DATA


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    assert TEACHER.exists(), f"reference teacher {TEACHER} missing: set CANAO_TEACHER"
    return TEACHER


@pytest.fixture(scope="session")
def teacher(teacher_dir):
    from canao.models.encoders import load_encoder

    return load_encoder(teacher_dir)


@pytest.fixture
def pools_opened(monkeypatch):
    """watch(cls) -> a list that receives the thread count of every `cls` (a compiled runtime: CompiledModel,
    CompiledDecoder) opened from then on, as its C thread pool was opened with it."""

    def watch(cls) -> list[int]:
        opened, real_init = [], cls.__init__

        def spy(self, folder, threads=None, check=True):
            real_init(self, folder, threads, check)
            opened.append(self.threads)

        monkeypatch.setattr(cls, "__init__", spy)
        return opened

    return watch
