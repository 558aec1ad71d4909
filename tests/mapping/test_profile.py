from collections import Counter

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from lhf_torchrec.mapping import FeatureProfiler, IdProfile, merge_profiles, profile_batches


def test_exact_counts_match_counter():
    ids = np.random.default_rng(0).integers(-50, 50, 5000)
    profile = IdProfile.from_ids(ids)
    expected = Counter(ids.tolist())
    assert profile.exact and profile.total == 5000
    assert dict(zip(profile.ids.tolist(), profile.counts.tolist())) == dict(expected)
    assert np.all(np.diff(profile.ids) > 0)


def test_merge_equals_profile_of_concatenation():
    rng = np.random.default_rng(1)
    parts = [rng.zipf(1.5, 1000) for _ in range(3)]
    merged = merge_profiles(IdProfile.from_ids(p) for p in parts)
    whole = IdProfile.from_ids(np.concatenate(parts))
    assert np.array_equal(merged.ids, whole.ids) and np.array_equal(merged.counts, whole.counts)
    assert merged.total == whole.total


def test_torch_tensor_and_kjt_stream():
    kjts = [
        KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 2, 2, 9]), lengths=torch.tensor([1, 1, 2, 0])),
        KeyedJaggedTensor.from_lengths_sync(keys=["a", "b"], values=torch.tensor([1, 9, 9]), lengths=torch.tensor([0, 1, 1, 1])),
    ]
    profiles = profile_batches(kjts)
    # stride 2: "a" gets lengths [1, 1] then [0, 1]; "b" gets [2, 0] then [1, 1]
    assert dict(zip(profiles["a"].ids.tolist(), profiles["a"].counts.tolist())) == {1: 2, 2: 1}
    assert dict(zip(profiles["b"].ids.tolist(), profiles["b"].counts.tolist())) == {2: 1, 9: 3}


def test_profiler_flushes_in_chunks():
    profiler = FeatureProfiler(chunk_size=10)
    for start in range(0, 100, 7):
        profiler.update("f", torch.arange(start, start + 7) % 13)
    profile = profiler.profiles()["f"]
    assert profile.total == 15 * 7
    assert int(profile.counts.sum()) == 105


def test_heavy_hitter_recall_on_zipf_stream():
    rng = np.random.default_rng(0)
    stream = rng.zipf(1.1, 400_000)
    capacity = 2000
    profiler = FeatureProfiler(capacity=capacity, chunk_size=20_000)
    for chunk in np.array_split(stream, 40):
        profiler.update("f", chunk)
    approx = profiler.profiles()["f"]
    exact = IdProfile.from_ids(stream)
    assert approx.num_ids <= capacity
    true_top = set(exact.top(200).tolist())
    recall = len(true_top & set(approx.top(200).tolist())) / 200
    assert recall >= 0.95, recall
    # Every reported count is a lower bound, short by at most error_bound <= N / (k + 1).
    true_counts = exact.counts_of(approx.ids)
    assert np.all(approx.counts <= true_counts)
    assert np.all(true_counts - approx.counts <= approx.error_bound)
    assert approx.error_bound <= stream.size / (capacity + 1)


def test_non_integer_ids_are_rejected():
    with pytest.raises(TypeError, match="table 'C7'.*float"):
        IdProfile.from_ids(np.array([1.5, 2.0]), table="C7")
    with pytest.raises(TypeError, match="dtype torch.float32"):
        IdProfile.from_ids(torch.tensor([1.0]))
