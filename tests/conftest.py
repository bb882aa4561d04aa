import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fixture_path(case: str, name: str) -> str:
    return os.path.join(FIXTURES, case, name)
