import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The start of a Python program in which `import palme_hf` fails, as where palme_hf is not installed.
WITHOUT_PALME_HF = """
import sys
sys.modules["palme_hf"] = None
try:
    import palme_hf
except ImportError:
    pass
else:
    raise SystemExit("palme_hf is importable")
"""
