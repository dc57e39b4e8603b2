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
