import pytest

from lhf_torchrec.pipeline.datasets import DatasetSpec, load_split


@pytest.fixture(scope="session")
def tiny_split():
    """6,000 synthetic rows over small tables: enough for a DLRM to learn something in seconds."""
    return load_split(DatasetSpec("synthetic", rows=6000, scale=0.0005, seed=3), embedding_dim=8, progress=False)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """CSV parse caches of these tests go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("LHF_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
