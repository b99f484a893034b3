"""Performance benchmarks of spacenet_np (not part of the installed package).

Each module runs as ``python -m benchmarks.<name>`` (or ``python benchmarks/<name>.py``) and writes JSON and a
Markdown table to ``benchmarks/results/``. Shared helpers live in :mod:`benchmarks.common`; the dense-masked
NumPy reference implementation of SpaceNet used for comparison lives in :mod:`benchmarks.dense_reference`.
"""
