from pathlib import Path

import pytest
import torch

# The checkout (tests run from it; glmtune itself never reaches above its package).
REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT.parent / "shared" / "chatglm-reference"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The tiny published-format checkpoints and golden outputs. CI always has them, so their absence is a
    failure: a skip here would hide every golden comparison at once."""
    if not REFERENCE.is_dir():
        pytest.fail(
            f"reference checkpoints not found at {REFERENCE}: the golden tests need them (place the "
            "chatglm-reference folder beside the repository)",
            pytrace=False,
        )
    return REFERENCE
