"""The CPU kernel of perfect hash mappings (``native.py``, ``native_lookup.c``): the rows of the torch ops, bit for
bit, whatever the batch; built once into the cache; the torch ops wherever it cannot run."""

import logging
import multiprocessing
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lhf_torchrec.mapping import IdMapping, native, perfect_hash
from lhf_torchrec.mapping.id_mapping import COMPILE_SETTINGS

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
CAN_RUN = (torch.backends.cpu.get_cpu_capability() == "AVX512"
           and shutil.which(os.environ.get("CC") or "cc") is not None
           and os.environ.get("LHF_TORCHREC_NATIVE", "1") != "0")
needs_kernel = pytest.mark.skipif(not CAN_RUN, reason="the kernel needs an AVX-512 CPU and a C compiler")


def _torch_rows(mapping: IdMapping, ids: torch.Tensor) -> torch.Tensor:
    """The rows the torch ops give (what CUDA and CPUs without the kernel run)."""
    return mapping._fill_hashed(*mapping._lookup(ids), ids)


KEY_SPANS = {"int64": (INT64_MIN, INT64_MAX), "40-bit": (0, 1 << 40), "int32": (1 << 50, (1 << 50) + (1 << 30))}


def _mapping(keys: str, num_entries: int, num_rows: int, seed: int) -> IdMapping:
    """A perfect hash mapping of ``num_entries`` random ``keys`` (a span of KEY_SPANS, its ends included)."""
    rng = np.random.default_rng(seed)
    low, high = KEY_SPANS[keys]
    ids = np.unique(np.concatenate([rng.integers(low, high, num_entries, dtype=np.int64), [low, high - 1]]))
    hashed = max(1, num_rows // 4)
    mapping = IdMapping.from_entries(ids, rng.integers(0, num_rows - hashed, ids.size), num_rows,
                                     hash_offset=num_rows - hashed, seed=seed, table_name=keys)
    return mapping.with_storage("perfect_hash")


def _queries(mapping: IdMapping, size: int, seed: int) -> torch.Tensor:
    """Stored keys, their neighbours (never stored here), extremes and random ids."""
    rng = np.random.default_rng(seed)
    keys = mapping.stored_entries()[0].numpy()
    with np.errstate(over="ignore"):
        pool = np.concatenate([keys, keys + 1, keys - 1, [INT64_MIN, INT64_MAX, 0, -1],
                               rng.integers(INT64_MIN, INT64_MAX, 100, dtype=np.int64)])
    return torch.from_numpy(rng.choice(pool, size))


def test_the_kernel_is_loaded_exactly_where_it_can_run():
    assert native.load() == CAN_RUN
    assert _mapping("int64", 2000, 500, seed=0)._native_layout == ("remainders" if CAN_RUN else None)


# Every slot layout, key width and row width of perfect_hash (layout, key dtype, row bytes).
LAYOUT_CASES = [("int64", 3000, 300, "remainders", torch.int64, 0), ("40-bit", 3000, 700, "records", torch.int64, 0),
                ("int64", 600, 700, "split", torch.int64, 2), ("int32", 3000, 700, "split", torch.int32, 2),
                ("int32", 3000, 1 << 16, "split", torch.int32, 3),
                ("int64", 600, (1 << 23) + 1, "split", torch.int64, 4)]


@needs_kernel
@pytest.mark.parametrize("keys,num_entries,num_rows,layout,key_dtype,row_bytes", LAYOUT_CASES)
def test_every_layout_applies_through_the_kernel_with_the_rows_of_the_torch_ops(keys, num_entries, num_rows, layout,
                                                                               key_dtype, row_bytes):
    mapping = _mapping(keys, num_entries, num_rows, seed=1)
    assert mapping._native_layout == layout == perfect_hash.slot_layout_of(mapping._buffers)
    if layout == "split":
        assert mapping.slot_keys.dtype == key_dtype and perfect_hash.row_bytes(num_rows) == row_bytes
    ids = _queries(mapping, 3001, seed=1)
    assert torch.equal(mapping(ids), _torch_rows(mapping, ids))
    keys_, rows = mapping.stored_entries()
    assert torch.equal(mapping(keys_), rows)  # every entry finds its own row
    # The last slots: the kernel gathers 4 bytes per narrow element and must not read past the arrays.
    slots, slot_rows = mapping._slot_entries()
    tail = slot_rows >= 0
    tail[:-4] = False
    assert tail.any() and torch.equal(mapping(slots[tail] + mapping.offset), slot_rows[tail])


@needs_kernel
def test_a_mapping_whose_buffers_a_fused_remap_packed_still_applies_alone():
    """FusedIdMappings makes a table's buffers strided views of its packed records (int32 keys, 3-byte rows)."""
    from lhf_torchrec.mapping.fused import FusedIdMappings

    mapping = _mapping("int32", 3000, 1 << 16, seed=9)
    ids = _queries(mapping, 2000, seed=9)
    expected = _torch_rows(mapping, ids)
    fused = FusedIdMappings({"t": mapping})
    assert "t" in fused.tables and not mapping.slot_keys.is_contiguous()
    assert torch.equal(mapping(ids), expected) and torch.equal(fused([ids], ["t"])[0], expected)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(keys=st.sampled_from(sorted(KEY_SPANS)), num_entries=st.integers(1, 6000),
       num_rows=st.one_of(st.integers(2, 5000), st.sampled_from([1 << 16, (1 << 23) + 1])),
       size=st.one_of(st.integers(0, 20), st.integers(1000, 3000)), seed=st.integers(0, 1 << 20))
def test_the_kernel_gives_the_rows_of_the_torch_ops(keys, num_entries, num_rows, size, seed):
    """Any table and batch size (whole vectors of 8 and blocks of 1,024 ids or not)."""
    mapping = _mapping(keys, num_entries, num_rows, seed)
    assert mapping._native_layout == perfect_hash.slot_layout_of(mapping._buffers)
    ids = _queries(mapping, size, seed)
    assert torch.equal(mapping(ids), _torch_rows(mapping, ids))
    strided = ids[::3]  # a view with a stride: the kernel reads contiguous ids
    assert torch.equal(mapping(strided), _torch_rows(mapping, strided.contiguous()))


@needs_kernel
@pytest.mark.parametrize("keys,layout", [("int64", "remainders"), ("40-bit", "records"), ("int32", "split")])
def test_ids_of_the_last_group_read_its_pilot(keys, layout):
    """The pilot gather reads 4 bytes at a time: the last group's 2-byte pilot is read apart, not past the array."""
    mapping = _mapping(keys, 5000, 700, seed=3)
    assert mapping._native_layout == layout
    entries, rows = mapping.stored_entries()
    mixed = perfect_hash._mixed(entries - mapping.offset, mapping._group_hash)
    groups = mapping.group_pilots.numel()
    group = perfect_hash._group_of(mixed, mapping._group_hash[0], groups, top_only=layout == "remainders")
    last = group == groups - 1
    assert last.any()
    assert torch.equal(mapping(entries[last]), rows[last])


@needs_kernel
def test_a_batch_split_over_threads_gives_the_same_rows(monkeypatch):
    mapping = _mapping("int64", 3000, 300, seed=4)
    ids = _queries(mapping, 5001, seed=4)
    expected = _torch_rows(mapping, ids)
    monkeypatch.setattr(native, "THREAD_CHUNK", 64)
    threads = torch.get_num_threads()
    try:
        for count in (2, 3, 7):
            torch.set_num_threads(count)
            assert torch.equal(mapping(ids), expected)
    finally:
        torch.set_num_threads(threads)


def _apply_in_child(mapping, ids, queue):
    torch.set_num_threads(2)
    queue.put(mapping(ids).tolist())  # a list: a tensor would go through shared memory the child takes with it


@needs_kernel
def test_a_forked_process_splits_a_batch_over_threads_with_the_parents_rows(monkeypatch):
    """A forked process (a DataLoader worker) after the parent used its threads: the same rows, no hang."""
    mapping = _mapping("int64", 3000, 300, seed=8)
    ids = _queries(mapping, 5000, seed=8)
    monkeypatch.setattr(native, "THREAD_CHUNK", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = mapping(ids)  # the parent's pool of 2 threads
    finally:
        torch.set_num_threads(threads)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_apply_in_child, args=(mapping, ids, queue))
    child.start()
    try:
        assert queue.get(timeout=60) == expected.tolist()
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()


@needs_kernel
def test_compiled_mappings_call_the_kernel_as_one_op(compiled_ops):
    mapping = _mapping("int64", 3000, 300, seed=5)
    ids = _queries(mapping, 4000, seed=5)
    assert torch.ops.lhf_torchrec.perfect_hash_rows.default in compiled_ops(mapping, ids)
    torch._dynamo.reset()
    compiled = torch.compile(mapping, **COMPILE_SETTINGS)
    assert torch.equal(compiled(ids), _torch_rows(mapping, ids))
    assert torch.equal(compiled(ids[:77]), _torch_rows(mapping, ids[:77]))


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A process that has not loaded the kernel, with its cache in ``tmp_path``."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


@needs_kernel
def test_the_kernel_is_built_once_into_the_cache(fresh_state, monkeypatch):
    assert native.load()
    built = list((fresh_state / "lhf_torchrec").glob("native_lookup-*.so"))
    assert len(built) == 1 and not list((fresh_state / "lhf_torchrec").glob(".*.tmp"))
    # Another process finds it there: no compile.
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_loaded", False)
    compiles = []
    run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run",
                        lambda args, **kw: compiles.append(args) if "-o" in args else run(args, **kw))
    assert native.load() and not compiles
    # A damaged file (its checksum no longer matches its name) is built again, not loaded.
    with open(built[0], "ab") as f:
        f.write(b"\0")
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.setattr(native.subprocess, "run", run)
    assert native.load()
    rebuilt = list((fresh_state / "lhf_torchrec").glob("native_lookup-*.so"))
    assert len(rebuilt) == 1 and native._checksum(rebuilt[0]) == rebuilt[0].stem.rsplit("-", 1)[1]


def test_a_compiler_that_fails_leaves_the_torch_ops(fresh_state, monkeypatch, caplog):
    compiler = fresh_state / "broken-cc"
    compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\n"
                        "echo 'no AVX-512 here' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.load()
    assert "no AVX-512 here" in caplog.text and "apply with torch ops" in caplog.text
    assert not list((fresh_state / "lhf_torchrec").glob("*.so")) and not list((fresh_state / "lhf_torchrec").glob(".*"))
    mapping = _mapping("int64", 2000, 500, seed=6)
    ids = _queries(mapping, 1000, seed=6)
    assert mapping._native_layout is None and torch.equal(mapping(ids), _torch_rows(mapping, ids))


@pytest.mark.parametrize("setting", ["switch", "capability"])
def test_the_kernel_stays_off_when_switched_off_or_without_avx512(fresh_state, monkeypatch, setting):
    if setting == "switch":
        monkeypatch.setenv("LHF_TORCHREC_NATIVE", "0")
    else:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not native.load()
    assert not (fresh_state / "lhf_torchrec").exists()  # nothing built
    assert _mapping("40-bit", 2000, 500, seed=7)._native_layout is None
