"""Shared by the benchmark scripts: machine description, markdown tables, docs sections."""

import os
import re
from typing import Dict, List, Sequence

import torch

from lhf_torchrec.files import atomic_write


def machine_description() -> str:
    """CPU model, cores and torch threads of this machine, for the record beside every number."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
            f"1-min load average {os.getloadavg()[0]:.1f} at the end")


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: List[Dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_doc_section(path: str, heading: str, body: str, title: str = "# Performance") -> None:
    """Replaces (or appends) the ``## heading`` section of a markdown file, atomically."""
    text = open(path).read() if os.path.exists(path) else f"{title}\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    with atomic_write(path) as f:
        f.write((text.rstrip("\n") + "\n").encode())
