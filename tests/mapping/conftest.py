import numpy as np
import pytest
import torch

from lhf_torchrec.mapping import IdEmbeddings, IdProfile, native


@pytest.fixture(scope="module")
def zipf_profile() -> IdProfile:
    """20k accesses over a few thousand ids, Zipf-distributed, with ids spread over 64 bits."""
    rng = np.random.default_rng(0)
    raw = rng.zipf(1.3, 20_000)
    return IdProfile.from_ids(raw * 1_000_003)


@pytest.fixture(scope="module")
def planted():
    """Ids in 20 well-separated groups: embeddings = group center + small noise."""
    rng = np.random.default_rng(1)
    num_ids, groups, dim = 2000, 20, 8
    group_of = rng.integers(0, groups, num_ids)
    centers = rng.normal(0, 5, (groups, dim))
    vectors = centers[group_of] + rng.normal(0, 0.1, (num_ids, dim))
    accesses = rng.choice(num_ids, 30_000, p=np.arange(1, num_ids + 1) ** -1.0 / (np.arange(1, num_ids + 1) ** -1.0).sum())
    profile = IdProfile.from_ids(accesses)
    embeddings = IdEmbeddings(np.arange(num_ids), torch.tensor(vectors, dtype=torch.float32))
    return profile, embeddings, group_of


@pytest.fixture
def torch_ops_only(monkeypatch):
    """Mappings built in the test apply with torch ops, as on CUDA or a CPU without the kernel (native.py)."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_loaded", True)


@pytest.fixture
def compiled_ops():
    """``ops(module, ids)``: the ops of the graph ``torch.compile`` captures of ``module(ids)`` (fullgraph, dynamic
    batch size), once that graph is checked to give the eager rows."""
    def ops(module, ids):
        graphs = []

        def capture(gm, inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        assert torch.equal(torch.compile(module, backend=capture, fullgraph=True, dynamic=True)(ids), module(ids))
        return {node.target for gm in graphs for node in gm.graph.nodes}
    return ops
