import pytest

from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split
from lhf_torchrec.pipeline.steps import profile_tables


@pytest.fixture(scope="session")
def tiny_split():
    """6,000 synthetic rows over small tables: enough for a DLRM to learn something in seconds."""
    return load_split(DatasetSpec("synthetic", rows=6000, scale=0.0005, seed=3), embedding_dim=8, progress=False)


@pytest.fixture(scope="session")
def tiny_profiles(tiny_split):
    return profile_tables(tiny_split.train, tiny_split.tables)
