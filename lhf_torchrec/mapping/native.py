"""The CPU kernel of a perfect hash mapping's apply (``native_lookup.c``): built on first use, called as a torch op.

A mapping whose entries sit in a perfect hash table (``perfect_hash`` storage, any slot layout: see
:mod:`~lhf_torchrec.mapping.perfect_hash`) applies its ids on CPU through :func:`perfect_hash_rows`, the op
``lhf_torchrec::perfect_hash_rows``: the entries' rows and the hash of every other id in one pass, bit for
bit the function the torch ops compute (the tests compare them). It exists because the torch ops, eager or
compiled by inductor, cost 3.3-3.9x a plain gather on tables that outgrow the caches, eager 9-20x on any
table (docs/performance.md, "Apply throughput").

It is used where it can run and the torch ops everywhere else, with the same rows:

* the CPU has AVX-512 (F, DQ, BW, VL) as torch reports it (``torch.backends.cpu.get_cpu_capability()``:
  Intel Xeon since Skylake-SP, AMD since Zen 4); a C compiler (``$CC``, else ``cc``) builds the kernel
  once per machine into ``$XDG_CACHE_HOME/lhf_torchrec`` (``~/.cache`` by default; the file is named by a
  hash of the source, flags and compiler and by its own checksum, checked before loading, and written
  atomically, so ranks that build at once do not clash);
* ``LHF_TORCHREC_NATIVE=0`` turns it off (the torch ops then run everywhere);
* CUDA ids, double hashing and bucketed mappings always take the torch ops, as does the fused remap of many
  tables (:mod:`~lhf_torchrec.mapping.fused`).

The library is plain C called through ``ctypes`` (which releases the GIL during the call) and registered
with ``torch.library.custom_op``, so ``torch.compile`` keeps it as one opaque op in its graph. Not a torch
C++ extension: ``torch.utils.cpp_extension`` needs ninja and compiles against torch's headers (tens of
seconds per machine), while the kernel only reads and writes int64 arrays.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from lhf_torchrec.mapping.hashing import hash_coefficients

LOG = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("native_lookup.c")
# x86-64-v4: AVX-512 F, BW, CD, DQ, VL (what torch calls AVX512) and BMI2; tuned for the building CPU, which
# changes no instruction a CPU of another kind could lack.
FLAGS = ("-O3", "-shared", "-fPIC", "-march=x86-64-v4", "-mtune=native")
# The slot layouts the kernel reads (its ``layout`` argument): every layout of perfect_hash.
LAYOUTS = {"records": 0, "remainders": 1, "split": 2}
# Ids per thread at least: below, one call on the calling thread costs less than handing out chunks.
THREAD_CHUNK = 1 << 16

_library: Optional[ctypes.CDLL] = None
_loaded = False
# Worker threads of large batches, and the process and size they were made for (a fork leaves a pool without threads).
_pool: Optional[ThreadPoolExecutor] = None
_pool_key = (0, 0)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lhf_torchrec"


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC") or "cc")


def _checksum(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _build(compiler: str) -> Path:
    """The kernel's shared library: ``native_lookup-<key>-<checksum>.so`` in the cache, the key a hash of the
    source, flags and compiler, the checksum the file's own (checked before it is loaded: a damaged file is
    removed and built again)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join((compiler, version, *FLAGS)).encode()).hexdigest()[:20]
    cache = _cache_dir()
    for path in sorted(cache.glob(f"native_lookup-{key}-*.so")):
        if _checksum(path) == path.stem.rsplit("-", 1)[1]:
            return path
        LOG.warning("the cached kernel %s does not match its checksum: building it again", path)
        path.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".native_lookup-{key}.", suffix=".tmp")
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{result.stderr.strip()}")
        path = cache / f"native_lookup-{key}-{_checksum(tmp)}.so"
        os.replace(tmp, path)  # atomic: a rank that builds at the same time sees no file or this whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    LOG.info("built the AVX-512 perfect hash kernel in %.1f s: %s", time.perf_counter() - start, path)
    return path


def load() -> bool:
    """Builds (once per machine) and loads (once per process) the kernel where it can run; whether it is
    loaded. Never raises: where it cannot be built, the torch ops serve (logged once)."""
    global _library, _loaded
    if _loaded:
        return _library is not None
    _loaded = True
    if os.environ.get("LHF_TORCHREC_NATIVE", "1") == "0" or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    compiler = _compiler()
    if compiler is None:
        LOG.info("no C compiler (%s): perfect hash mappings apply with torch ops", os.environ.get("CC") or "cc")
        return False
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        LOG.warning("the AVX-512 perfect hash kernel is not available (%s); mappings apply with torch ops", error)
        return False
    function = library.lhf_perfect_hash_rows
    function.restype = None
    pointer, integer = ctypes.c_void_p, ctypes.c_int64
    function.argtypes = [pointer, integer, integer, pointer, integer, pointer, pointer, integer, integer, pointer,
                         integer, pointer, integer, integer, integer, pointer, pointer]
    _library = library
    return True


@functools.lru_cache(maxsize=256)
def _coefficients(hash_rows: int, seed: int) -> torch.Tensor:
    """(num_buckets, a0, a1, a2, b) of ``hash_ids(., hash_rows, seed)``; read-only, shared by every call."""
    return torch.tensor([hash_rows, *hash_coefficients(seed)], dtype=torch.int64)


def perfect_hash_rows(ids: torch.Tensor, slots: torch.Tensor, rows_low: torch.Tensor, rows_high: torch.Tensor,
                      pilots: torch.Tensor, group_hash: torch.Tensor, layout: int, low_bits: int, key_offset: int,
                      hash_offset: int, hash_rows: int, seed: int) -> torch.Tensor:
    """Rows of flat int64 CPU ``ids`` in a perfect hash table (:mod:`~lhf_torchrec.mapping.perfect_hash`) of
    ``layout`` (a value of :data:`LAYOUTS`): the entry's row where an id has one, else ``hash_offset +
    hash_ids(id, hash_rows, seed)``. ``slots``: the int64 records or remainders, or the split layout's keys
    (int32 or int64) with its ``rows_low`` and ``rows_high`` (empty for the other layouts and for rows of 2
    bytes). Needs :func:`load` to have returned True.

    Under ``torch.compile`` the op ``lhf_torchrec::perfect_hash_rows``; eager, its implementation called
    directly: the dispatcher's round trip through Python costs ~20 us a call, more than the kernel's work on a
    few thousand ids."""
    args = (ids, slots, rows_low, rows_high, pilots, group_hash, layout, low_bits, key_offset, hash_offset,
            hash_rows, seed)
    if torch.compiler.is_compiling():
        return _perfect_hash_rows_op(*args)
    return _perfect_hash_rows(*args)


def _perfect_hash_rows(ids: torch.Tensor, slots: torch.Tensor, rows_low: torch.Tensor, rows_high: torch.Tensor,
                       pilots: torch.Tensor, group_hash: torch.Tensor, layout: int, low_bits: int, key_offset: int,
                       hash_offset: int, hash_rows: int, seed: int) -> torch.Tensor:
    if _library is None:
        raise RuntimeError("native.perfect_hash_rows called without the kernel loaded (native.load())")
    ids, slots, rows_low, rows_high, pilots, group_hash = (
        t.contiguous() for t in (ids, slots, rows_low, rows_high, pilots, group_hash))
    out = torch.empty_like(ids)
    n = ids.numel()
    if not n:
        return out
    coefficients = _coefficients(hash_rows, seed)
    size = ids.element_size()

    def run(start: int, stop: int) -> None:
        _library.lhf_perfect_hash_rows(
            ids.data_ptr() + start * size, stop - start, layout, slots.data_ptr(), slots.element_size(),
            rows_low.data_ptr(), rows_high.data_ptr(), rows_high.element_size() if rows_high.numel() else 0,
            slots.numel(), pilots.data_ptr(), pilots.numel(), group_hash.data_ptr(), low_bits, key_offset,
            hash_offset, coefficients.data_ptr(), out.data_ptr() + start * size)

    threads = min(torch.get_num_threads(), n // THREAD_CHUNK)
    if threads <= 1:
        run(0, n)
        return out
    global _pool, _pool_key
    if _pool_key != (os.getpid(), threads):
        if _pool is not None and _pool_key[0] == os.getpid():
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lhf_native")
        _pool_key = (os.getpid(), threads)
    bounds = [n * i // threads for i in range(threads + 1)]
    for future in [_pool.submit(run, bounds[i], bounds[i + 1]) for i in range(threads)]:
        future.result()
    return out


_perfect_hash_rows_op = torch.library.custom_op("lhf_torchrec::perfect_hash_rows", _perfect_hash_rows,
                                              mutates_args=())


@_perfect_hash_rows_op.register_fake
def _(ids, slots, rows_low, rows_high, pilots, group_hash, layout, low_bits, key_offset, hash_offset, hash_rows, seed):
    return torch.empty_like(ids)
