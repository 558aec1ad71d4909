"""File plumbing shared by the readers and writers: atomic writes, opening, error reporting.

Readers report malformed input in one way: with ``on_error="raise"`` the first bad line raises a
:class:`DataFormatError` naming file and line; with ``on_error="skip"`` bad lines are dropped and
counted in a :class:`ParseReport` (the first few with file, line and reason), logged as a warning at
the end of each pass.
"""

import bz2
import gzip
import hashlib
import logging
import lzma
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Literal, Sequence

import numpy as np

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
OnError = Literal["raise", "skip"]
MAX_REPORTED_LINES = 5


def resolve_cache_dir(cache_dir: PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$LHF_CACHE_DIR``, else ``~/.cache/lhf_torchrec``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("LHF_CACHE_DIR"):
        return Path(os.environ["LHF_CACHE_DIR"])
    return Path.home() / ".cache" / "lhf_torchrec"


def file_sha256(path: PathLike, block_bytes: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in blocks (files larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


class DataFormatError(ValueError):
    """Malformed input; the message starts with ``file:line:``.

    Example::

        try:
            CriteoTSV("day_0.tsv").load()
        except DataFormatError as e:
            print(e.path, e.line, e)
    """

    def __init__(self, path: PathLike, line: int | None, reason: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason

    def __reduce__(self):  # pickles (e.g. from a parsing worker) as the error it is
        return type(self), (self.path, self.line, self.reason)


@dataclass
class ParseReport:
    """What one pass over text files read and skipped.

    ``examples`` holds ``"file:line: reason"`` for the first :data:`MAX_REPORTED_LINES` bad lines.
    """

    lines_read: int = 0
    lines_skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def add_bad_lines(self, path: PathLike, lines: Sequence[int], reasons: Sequence[str]) -> None:
        """Counts bad ``lines`` (1-based) of ``path``; ``reasons`` explain the first of them."""
        for line, reason in zip(lines, reasons):
            if len(self.examples) < MAX_REPORTED_LINES:
                self.examples.append(f"{path}:{line}: {reason}")
        self.lines_skipped += len(lines)

    def extend(self, other: "ParseReport") -> None:
        """Adds what ``other``, a report of the lines after this one's, read and skipped."""
        self.lines_read += other.lines_read
        self.lines_skipped += other.lines_skipped
        self.examples.extend(other.examples[: MAX_REPORTED_LINES - len(self.examples)])

    def log(self) -> None:
        if self.lines_skipped:
            # No examples: the records were skipped when the parse cache was built, which logged the first ones.
            first = f"; first: {'; '.join(self.examples)}" if self.examples else ""
            logger.warning("skipped %d malformed of %d lines%s", self.lines_skipped, self.lines_read, first)


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def check_readable(path: PathLike) -> Path:
    """Fails early, naming the file, when ``path`` is missing, a directory or unreadable."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise IsADirectoryError(f"{path}: not a regular file")
    with open(path, "rb"):
        pass
    return path


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zip")


def open_binary(path: PathLike) -> IO[bytes]:
    """Opens ``path`` for reading bytes, decompressing ``.gz``, ``.bz2``, ``.xz`` files and the one
    file of a ``.zip`` archive (as data sites ship them) on the fly."""
    name = str(path)
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith(".zip"):
        return _zip_member(path)
    return open(path, "rb")


def _zip_member(path: PathLike) -> IO[bytes]:
    """The one file of a zip archive (folders and macOS' ``__MACOSX/`` entries aside), open for reading."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
            if len(members) != 1:
                names = ", ".join(m.filename for m in members[:5]) + (" ..." if len(members) > 5 else "")
                raise DataFormatError(path, None, f"a zip archive of {len(members)} files ({names}); give an archive "
                                                  "of one file, or the files unpacked")
            return archive.open(members[0])  # stays readable after the archive object closes
    except (zipfile.BadZipFile, NotImplementedError) as e:  # NotImplementedError: e.g. deflate64
        raise DataFormatError(path, None, f"not a readable zip archive: {e}") from None


# What reading a damaged compressed file raises; bz2 raises a plain OSError (see is_damaged_compressed).
COMPRESSION_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, zipfile.BadZipFile, OSError)


def is_damaged_compressed(path: PathLike, error: Exception) -> bool:
    """Whether ``error``, one of :data:`COMPRESSION_ERRORS` met reading ``path``, says the compressed
    file is damaged (an OSError of an uncompressed file is the system's, not the data's)."""
    if isinstance(error, gzip.BadGzipFile) or not isinstance(error, OSError):
        return True
    return type(error) is OSError and str(path).endswith(COMPRESSED_SUFFIXES)  # bz2's "Invalid data stream"


def corrupt_compressed_file(path: PathLike, error: Exception) -> "DataFormatError":
    return DataFormatError(path, None, f"corrupt or truncated compressed file: {error}")


def line_blocks(path: PathLike, block_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Blocks of whole lines as ``(data, end)``: ``data[:end]`` ends with a newline (one is added
    to a last unterminated line). Not slicing ``data`` saves a copy of every block."""
    carry = b""
    with open_binary(path) as f:
        while True:
            try:
                data = f.read(block_bytes)
            except COMPRESSION_ERRORS as e:
                if not is_damaged_compressed(path, e):
                    raise
                raise corrupt_compressed_file(path, e) from e
            if not data:
                break
            data = carry + data
            end = data.rfind(b"\n") + 1
            carry = data[end:]
            if end:
                yield data, end
    if carry:
        yield carry + b"\n", len(carry) + 1


def open_npy(path: PathLike) -> np.ndarray:
    """A memory map of an npy file; anything else (a pickle, garbage, a bad header) is a
    :class:`DataFormatError` naming the file. Pickles are never loaded."""
    try:
        return np.load(check_readable(path), mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        if isinstance(e, (FileNotFoundError, IsADirectoryError)):
            raise
        raise DataFormatError(path, None, f"not a numpy .npy array file ({e})") from None
