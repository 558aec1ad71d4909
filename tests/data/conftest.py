"""Fixtures shared by the data-layer tests."""

import pytest

from lhf_torchrec.data import SyntheticCriteo, SyntheticCriteoConfig, make_synthetic_criteo


@pytest.fixture(scope="session")
def synthetic() -> SyntheticCriteo:
    """100k rows at scale 1e-3: the ids-per-row ratio of the default scale at 1M rows."""
    return make_synthetic_criteo(100_000, SyntheticCriteoConfig(scale=1e-3, seed=7), progress=False)
