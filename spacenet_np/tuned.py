"""The ``tuned`` preset's values: chosen by random search on validation data (issue 11), per stream and method.

Written by ``python -m benchmarks.fidelity.make_tuned`` from ``benchmarks/results/fidelity/search/*/best.json``;
each entry names the sweep it came from. Only the values that differ from the paper preset are listed.
"""
TUNED = {}
