"""Writing files atomically: readers see either the old file or the complete new one."""

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
