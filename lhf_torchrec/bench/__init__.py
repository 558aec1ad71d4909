"""Benchmark harnesses behind ``lhf bench``: the quality benchmark (every method at equal bytes,
the report's gap-recovered tables and verdicts). Nothing in the library imports this package."""
