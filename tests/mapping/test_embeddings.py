import numpy as np
import pytest
import torch

from lhf_torchrec.mapping import IdEmbeddings, embeddings_from_table


def test_pca_keeps_the_directions_of_largest_variance():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.1, 0.1])
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    weight = (torch.randn(2000, 6, generator=g) * scales) @ basis.T + 3.0
    reduced = embeddings_from_table(weight, 2)
    assert reduced.shape == (2000, 2)
    variances = reduced.var(dim=0)
    assert variances[0] > variances[1] > 0
    assert torch.allclose(variances.sqrt(), scales[:2], rtol=0.1)
    # The projection equals numpy's SVD up to the sign of each axis.
    centered = (weight - weight.mean(0)).double().numpy()
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    expected = torch.from_numpy(centered @ vt[:2].T).float()
    for k in range(2):
        assert torch.allclose(reduced[:, k].abs(), expected[:, k].abs(), atol=1e-3)
    assert torch.equal(embeddings_from_table(weight, 2), reduced)  # deterministic, signs included


def test_pca_rejects_bad_input():
    with pytest.raises(ValueError, match="dim must be in \\[1, 4\\], got 5"):
        embeddings_from_table(torch.zeros(3, 4), 5)
    bad = torch.zeros(3, 4)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        embeddings_from_table(bad, 2)


def test_id_embeddings_sort_and_validate():
    e = IdEmbeddings(np.array([9, 2, 5]), torch.tensor([[9.0], [2.0], [5.0]]))
    assert e.ids.tolist() == [2, 5, 9] and e.vectors[:, 0].tolist() == [2.0, 5.0, 9.0]
    with pytest.raises(ValueError, match="ids must be unique"):
        IdEmbeddings(np.array([1, 1]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="2 ids but vectors of shape \\(3, 3\\)"):
        IdEmbeddings(np.array([1, 2]), torch.zeros(3, 3))
