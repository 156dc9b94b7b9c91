"""Block tests use tiny tensors: run them all on one intra-op thread (see tests/conftest.py)."""

import pytest


@pytest.fixture(autouse=True)
def _blocks_on_one_thread(one_thread):
    yield
