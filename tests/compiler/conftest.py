import pytest

from compiler_helpers import small_model


@pytest.fixture(scope="session")
def model():
    return small_model()


@pytest.fixture(scope="session")
def graph(model):
    from canao.compiler.frontend import capture

    return capture(model, 64)


@pytest.fixture(scope="session")
def artifact_dir(model, tmp_path_factory):
    from canao.compiler import compile_model

    out = tmp_path_factory.mktemp("artifact") / "small"
    compile_model(model, out, max_seq=64)
    return out


@pytest.fixture(scope="session")
def compiled(artifact_dir):
    from canao.compiler import load_artifact

    return load_artifact(artifact_dir, threads=2)


@pytest.fixture(scope="session", autouse=True)
def _private_tuning_db(tmp_path_factory):
    """Compiles in the tests read and write their own tuning database, not the user's."""
    import os

    old = os.environ.get("CANAO_TUNING_DB")
    os.environ["CANAO_TUNING_DB"] = str(tmp_path_factory.mktemp("tuning") / "tuning.json")
    yield
    if old is None:
        os.environ.pop("CANAO_TUNING_DB", None)
    else:
        os.environ["CANAO_TUNING_DB"] = old
