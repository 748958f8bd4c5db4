"""The embedded default ships inside the package; the checkout's config/ and data/ hold copies of it."""

import pytest

from glmtune.config import DEFAULT_CONFIG, DEMO_DIR
from tests.conftest import REPO_ROOT

COPIES = {
    "config/default.yaml": DEFAULT_CONFIG,
    "data/train.json": DEMO_DIR / "data" / "train.json",
    "data/dev.json": DEMO_DIR / "data" / "dev.json",
}


@pytest.mark.parametrize("copy", sorted(COPIES))
def test_the_checkouts_copy_equals_the_packaged_file(copy: str) -> None:
    packaged = COPIES[copy]
    assert (REPO_ROOT / copy).read_bytes() == packaged.read_bytes(), (
        f"{copy} and {packaged.relative_to(REPO_ROOT)} differ: edit both (the package's is what runs by default)"
    )
