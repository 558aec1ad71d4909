"""Files on disk: atomic writes, what an artifact file holds, the output guard, checksums.

Every lhf_torchrec output goes through :func:`atomic_write` (readers see the old file or the
complete new one), declares its ``format``, and carries a checksum that loading verifies; every
command checks its outputs with :func:`check_output_file` / :func:`check_output_dir` before it
starts, so no command writes over its input or over a file that is not its own kind of artifact.
"""

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[IO[bytes]]:
    """Writes a file all at once: readers see either the old file or the complete new one.

    The bytes go to a temporary file in the same directory, which replaces ``path`` only when the
    block ends without error.

    Example::

        with atomic_write("out/day_0_dense.npy") as f:
            np.save(f, dense)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file private (0600); give it the usual permissions of a data file.
            os.fchmod(f.fileno(), 0o644)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"{path}: not written ({e.strerror}); the previous file, if any, is unchanged") from e
        raise


def read_safetensors(path: PathLike, what: str = "file") -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """The metadata header and the tensors of a safetensors file (loading never unpickles).

    Raises ``FileNotFoundError`` when ``path`` is missing and ``ValueError`` when it is not a
    readable safetensors file; both name ``what`` (e.g. ``"mapping file"``) and the path.
    """
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors {what} ({e})") from e


# ------------------------------------------------------------------ what a file is

#: The largest safetensors header (JSON) read when asking what a file holds.
_MAX_HEADER_BYTES = 100 << 20
#: The largest JSON artifact parsed when asking what a file holds.
_MAX_JSON_BYTES = 64 << 20


def artifact_format(path: PathLike) -> Optional[str]:
    """The ``format`` an lhf_torchrec artifact declares (safetensors header metadata, or a JSON
    object's ``"format"``); None for any other file. Reads only the header, never tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            length = int.from_bytes(head, "little")
            if 2 <= length <= _MAX_HEADER_BYTES:
                header = _json_object(f.read(length))
                if header is not None:
                    meta = header.get("__metadata__")
                    return _format_of(meta) if isinstance(meta, dict) else None
        if os.fstat(f.fileno()).st_size <= _MAX_JSON_BYTES:
            f.seek(0)
            found = _json_object(f.read())
            return _format_of(found) if found is not None else None
    return None


def _json_object(raw: bytes) -> Optional[dict]:
    try:
        value = json.loads(raw)
    except ValueError:  # also UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def _format_of(meta: dict) -> Optional[str]:
    value = meta.get("format")
    return value if isinstance(value, str) else None


# ------------------------------------------------------------------ the output guard


def _same_file(a: PathLike, b: PathLike) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_not_an_input(path: PathLike, inputs: Iterable[PathLike], flag: str) -> None:
    for source in inputs:
        if _same_file(path, source):
            raise ValueError(f"{flag} {path} is also an input of this command; refusing to write over it")


def _check_can_create_in(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a directory we can create files in."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {ancestor} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise PermissionError(f"{flag} {path}: cannot write in {ancestor} ({e.strerror})") from None


def check_output_file(path: PathLike, kind: str, inputs: Iterable[PathLike] = (), *, flag: str = "output") -> None:
    """Refuses, naming ``flag`` and the path, an output file that is an input, a directory, a file
    holding anything but a ``kind`` artifact, or a place that cannot be written.

    Example::

        check_output_file("profiles.safetensors", "lhf_torchrec.profiles/1", inputs=["day_0.tsv"], flag="--out")
    """
    path = Path(path)
    _check_not_an_input(path, inputs, flag)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory; give a file name")
    if path.exists():
        if not path.is_file():
            raise ValueError(f"{flag} {path} is not a regular file; refusing to write over it")
        found = artifact_format(path)
        if found != kind:
            what = f"an lhf_torchrec '{found}' artifact" if found else "a file that is not an lhf_torchrec artifact"
            raise ValueError(f"{flag} {path} exists and holds {what}, not '{kind}'; refusing to write over it "
                             f"(delete it or choose another path)")
        if not os.access(path, os.W_OK):
            raise PermissionError(f"{flag} {path} exists and is not writable")
    _check_can_create_in(path, flag)


def check_output_dir(path: PathLike, inputs: Iterable[PathLike] = (), *, flag: str = "output directory") -> None:
    """Refuses, naming ``flag`` and the path, an output directory that is an input, a file, or
    cannot be written."""
    path = Path(path)
    _check_not_an_input(path, inputs, flag)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file, not a directory")
    _check_can_create_in(path / "probe", flag)


# ------------------------------------------------------------------ checksums


def tensors_checksum(tensors: Mapping[str, "torch.Tensor"], meta: Any = None) -> str:
    """sha256 over JSON ``meta`` and the named tensors' dtypes, shapes and bytes (order-independent)."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def safetensors_checksum(handle: Any, names: Iterable[str], meta: Any = None, rows_per_chunk: int = 1 << 22) -> str:
    """:func:`tensors_checksum` of the tensors ``names`` of a file opened with ``safetensors.safe_open``
    (framework "pt"), read ``rows_per_chunk`` rows at a time: memory stays bounded, whatever their size."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(names):
        part = handle.get_slice(name)
        shape = tuple(part.get_shape())
        if not shape:  # a scalar: small
            tensor = handle.get_tensor(name)
            digest.update(f"{name}:{tensor.dtype}:{shape}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
            continue
        digest.update(f"{name}:{part[0:0].dtype}:{shape}".encode())
        for start in range(0, shape[0], rows_per_chunk):
            digest.update(part[start:start + rows_per_chunk].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
