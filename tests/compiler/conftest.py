import pytest

from compiler_helpers import small_model


@pytest.fixture(scope="session")
def model():
    return small_model()


@pytest.fixture(scope="session")
def graph(model):
    from canao.compiler.frontend import capture

    return capture(model, 64)
