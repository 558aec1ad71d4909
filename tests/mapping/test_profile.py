import os
from collections import Counter

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from lhf_torchrec.mapping import FeatureProfiler, IdProfile, merge_profiles, profile_batches
from lhf_torchrec.mapping.hashing import bucket_of
from lhf_torchrec.mapping import SpillingProfiler


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


# ------------------------------------------------------------------ spilling profiler (larger than memory)


def _zipf_stream(seed: int, n: int = 40_000):
    rng = np.random.default_rng(seed)
    sparse = (rng.zipf(1.3, n) % 5000) * 0x9E3779B97F4A7 - (1 << 50)  # negative and 64-bit ids too
    return np.array_split(sparse, 17), np.array_split(rng.integers(0, 50, n), 5)


@pytest.mark.parametrize("seed, chunk_size", [(0, 1000), (1, 7), (2, 1 << 22)])
def test_spilled_profiles_equal_in_memory_exact_profiles(tmp_path, seed, chunk_size):
    sparse, dense = _zipf_stream(seed)
    copies = [a.copy() for a in sparse]
    (tmp_path / "keep.txt").write_text("not the profiler's")
    exact = FeatureProfiler()
    with SpillingProfiler(directory=str(tmp_path), num_buckets=8, seed=3, chunk_size=chunk_size) as spilling:
        for a in sparse:
            exact.update("s", a)
            spilling.update("s", a)
        for a in dense:
            exact.update("d", torch.from_numpy(a))
            spilling.update("d", torch.from_numpy(a))
        spilling.update("empty", np.zeros(0, np.int64))
        spill_dir = spilling.directory
        assert os.path.dirname(spill_dir) == str(tmp_path)
        want, got = exact.profiles(), spilling.profiles()
        assert set(got) == set(want) | {"empty"} and got["empty"].num_ids == 0
        for name in want:
            assert np.array_equal(got[name].ids, want[name].ids) and np.array_equal(got[name].counts, want[name].counts)
            assert got[name].total == want[name].total and got[name].exact
        # parts: each bucket's ids, sorted, with their exact counts; together the whole profile
        parts = list(spilling.parts("s"))
        assert [b for b, _ in parts] == list(range(8))
        for bucket, part in parts:
            assert np.all(bucket_of(torch.from_numpy(part.ids), 8, 3).numpy() == bucket)
            assert np.array_equal(part.counts, want["s"].counts_of(part.ids)) and np.all(np.diff(part.ids) > 0)
        assert sum(p.num_ids for _, p in parts) == want["s"].num_ids
    assert not os.path.exists(spill_dir)  # removed, and nothing else touched
    assert (tmp_path / "keep.txt").read_text() == "not the profiler's"
    assert all(np.array_equal(a, b) for a, b in zip(sparse, copies))


def test_spilling_profiler_removes_its_files_on_error_and_refuses_use_after_close(tmp_path):
    with pytest.raises(RuntimeError, match="data error"):
        with SpillingProfiler(directory=str(tmp_path), chunk_size=10) as profiler:
            profiler.update("C1", np.arange(100))
            assert os.listdir(profiler.directory)
            raise RuntimeError("data error")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        profiler.update("C1", np.arange(100))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SpillingProfiler(directory=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="table 'C2': ids must be integers"):
        SpillingProfiler(directory=str(tmp_path)).update("C2", np.ones(3))
