import numpy as np
import torch

from lhf_torchrec.mapping import IdEmbeddings, kmeans
from lhf_torchrec.mapping.embeddings import embedding_rows, embeddings_of


def test_clustering_rows_of_a_store_equals_clustering_the_gathered_points(monkeypatch):
    """The memory-lean paths (points as rows of a larger matrix, gathered by block; sums in chunks)
    give the same labels and centers, bit for bit, as clustering the gathered points in one pass."""
    g = torch.Generator().manual_seed(1)
    store = torch.randn(6_500, 4, generator=g)
    rows = torch.randperm(6_500, generator=g)[:6_000]
    weights = torch.randint(1, 50, (6_000,), generator=g).float()
    points = store[rows]
    whole = kmeans.cluster(points, weights, 300, seed=3, progress=False)
    whole_centers = kmeans.cluster_centers(points, weights, whole, 300)
    monkeypatch.setattr(kmeans, "_BLOCK", 1 << 14)  # several blocks per assignment
    monkeypatch.setattr(kmeans, "_CHUNK", 999)  # several chunks per sum
    lean = kmeans.cluster(store, weights, 300, seed=3, progress=False, rows=rows)
    assert lean.dtype == torch.int32 and torch.equal(lean, whole)
    assert torch.equal(kmeans.cluster_centers(store, weights, lean, 300, rows=rows), whole_centers)


def test_embedding_rows_point_into_the_store_without_copying():
    ids = np.array([3, 10, 42, 77], dtype=np.int64)
    vectors = torch.arange(8, dtype=torch.float32).view(4, 2)
    emb = IdEmbeddings(ids, vectors)
    assert emb.vectors.data_ptr() == vectors.data_ptr()  # sorted ids: nothing copied
    query = np.array([77, 5, 3], dtype=np.int64)
    has, store, rows = embedding_rows(emb, query)
    assert has.tolist() == [True, False, True] and store.data_ptr() == vectors.data_ptr() and rows.tolist() == [3, 0]
    # Known to be positions of the embeddings' own ids: no search, same answer.
    has, _, rows = embedding_rows(emb, ids[[3, 0]], sorted_ids=(ids.copy(), np.array([3, 0])))
    assert has.all() and rows.tolist() == [3, 0]
    assert torch.equal(embeddings_of(emb, query)[1], vectors[[3, 0]])
    shuffled = IdEmbeddings(ids[::-1].copy(), vectors.flip(0))
    assert np.array_equal(shuffled.ids, ids) and torch.equal(shuffled.vectors, vectors)


def test_emptied_clusters_are_reseeded_with_int32_labels():
    x = torch.tensor([[0.0, 0.0]] * 4 + [[5.0, 5.0]] * 4 + [[9.0, 0.0]] * 4)  # 3 distinct points, 5 clusters
    centers, labels = kmeans.weighted_kmeans(x, torch.ones(12), 5, generator=torch.Generator().manual_seed(0))
    assert labels.dtype == torch.int32 and int(labels.min()) >= 0 and int(labels.max()) < 5
