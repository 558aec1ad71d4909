"""Reusable ``argparse`` types of the ``lhf`` commands: bounded numbers, inputs and outputs.

Every command declares its arguments with these types, so every command gets the same checks:
a number outside its range is an argparse error naming the flag, and :func:`check_outputs` (run
by ``lhf`` after parsing, before any work) refuses an output that would destroy something (see
:func:`lhf_torchrec.files.check_output_file`).

Example::

    parser.add_argument("--dim", type=int_in(4, 16), default=8)
    parser.add_argument("--profiles", type=input_path)
    parser.add_argument("--out", type=output_file(PROFILES_FORMAT))
"""

import argparse
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from lhf_torchrec.files import check_output_dir, check_output_file


def int_in(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    bounds = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite number between ``low`` and ``high`` (ends included unless ``*_open``)."""
    if math.isinf(high):
        bounds = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        bounds = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {bounds}, got {text}")
        return value

    return parse


def comma_list(item: Callable[[str], Any]) -> Callable[[str], List[Any]]:
    """Comma-separated values, each parsed (and bounded) by ``item``; at least one."""

    def parse(text: str) -> List[Any]:
        parts = [x.strip() for x in text.split(",") if x.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, got {text!r}")
        return [item(x) for x in parts]

    return parse


def fit_setting(text: str) -> Tuple[str, Union[int, float, str]]:
    """``NAME=VALUE``, a setting of a mapping method's fit (``min_count=30``, ``hot_fraction=auto``): the
    value an integer, a finite number or ``auto``. Whether the method takes it is checked by the command
    (:func:`~lhf_torchrec.mapping.fit.check_fit_settings`)."""
    name, equals, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if not equals or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. min_count=30), got {text!r}")
    if value == "auto":
        return name, value
    try:
        return name, int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{name}: expected a number or 'auto', got {value!r}")
    return name, number


def fit_settings_of(pairs: Optional[Sequence[Tuple[str, Any]]]) -> Dict[str, Any]:
    """The settings of repeated ``--param NAME=VALUE`` flags as a dict (a name given twice is an error)."""
    settings: Dict[str, Any] = {}
    for name, value in pairs or ():
        if name in settings:
            raise ValueError(f"--param {name} is given twice ({settings[name]} and {value})")
        settings[name] = value
    return settings


#: Bounds of settings that several commands take (lhf and examples/dlrm).
COMPRESSION = float_in(1)  # full table bytes / compressed bytes
LEARN_DIMS = (4, 16)  # dims of the learned id embeddings
SEED = int_in(0, 2**32 - 1)  # numpy's generators take no negative seeds


class InputPath(str):
    """A path the command reads."""


class OutputFile(str):
    """A file the command writes; ``kind`` is the artifact format it may replace."""

    kind: str = ""


class OutputDir(str):
    """A directory the command writes into."""


def input_path(text: str) -> InputPath:
    return InputPath(text)


def output_file(kind: str) -> Callable[[str], OutputFile]:
    """The type of an output file holding artifacts of format ``kind``."""

    def parse(text: str) -> OutputFile:
        path = OutputFile(text)
        path.kind = kind
        return path

    return parse


def output_dir(text: str) -> OutputDir:
    return OutputDir(text)


def _paths(value: Any) -> Iterable[str]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _paths(item)
    elif isinstance(value, str):
        yield value


def check_outputs(args: argparse.Namespace) -> None:
    """Refuses, before any work, every output argument that would overwrite an input, a file of
    another kind, or cannot be written (see :mod:`lhf_torchrec.files`)."""
    named = [(f"--{dest.replace('_', '-')}", path) for dest, value in vars(args).items() for path in _paths(value)]
    inputs = [path for _, path in named if isinstance(path, InputPath)]
    for flag, path in named:
        if isinstance(path, OutputFile):
            check_output_file(path, path.kind, inputs, flag=flag)
        elif isinstance(path, OutputDir):
            check_output_dir(path, inputs, flag=flag)
