"""The ``tuned`` preset's values: chosen by random search on validation data (issue 11), per stream and method.

The top 5 trials of each search are rerun with seeds 0-9 on validation data (``benchmarks/fidelity/stage2.py``)
and the best is kept; ``python -m benchmarks.fidelity.make_tuned`` writes this file from the searches'
``stage2.json``. Each entry names its source. Only the values that differ from the paper preset are listed.
"""
TUNED = {}
