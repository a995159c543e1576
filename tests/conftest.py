import pytest


@pytest.fixture(scope="session")
def model_dir():
    from cachegen_vllm.model import ensure_default_model

    return ensure_default_model()
