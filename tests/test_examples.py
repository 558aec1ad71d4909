import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_existing_model_example_trains_after_the_swap():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "existing_model.py")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"(\d+) tables compressed \(([\d.]+)x fewer rows overall\); loss ([\d.]+) -> ([\d.]+)", out.stdout)
    assert match, out.stdout
    tables, ratio, first, last = int(match[1]), float(match[2]), float(match[3]), float(match[4])
    assert tables >= 3 and ratio > 5
    assert last < first - 0.02
