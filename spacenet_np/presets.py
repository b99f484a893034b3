"""Presets: complete hyperparameter sets a run starts from, before the values a user sets.

- ``paper`` (the default): the paper's values. The MLP (Sec. 5.1): 784-400-400-10, 4 epochs, lr 0.01, batch 128,
  10000/1640/80 connections per task, 80 selected and 40 reserved neurons per hidden layer, rewire ratio 0.2,
  Xavier bound from the full layer. The CNN (Sec. 5.3.1): lr 0.1, 20 epochs, 12 % of every layer per task, every
  map selected, 2 2 5 6 30 reserved, Xavier bound from the connections per neuron (see ``SpaceNetConfig``).
- ``tuned``: the paper's values with those chosen by random search on validation data (``spacenet_np.tuned``,
  written by ``benchmarks/fidelity/make_tuned.py`` from the searches' best.json), per stream and method.
"""
from .tuned import TUNED

CNN_TASKS = ("split_cifar10", "cifar10_100")
CNN_WIDTHS = {"standard": (32, 32, 64, 64), "wide": (64, 64, 128, 128)}
PRESETS = ("paper", "tuned")


class PresetError(ValueError):
    """An unknown preset name."""


def architecture(task, arch="auto"):
    """'cnn' or 'mlp': ``arch``, or for 'auto' the paper's CNN for the CIFAR streams and the MLP otherwise."""
    if arch != "auto":
        return arch
    return "cnn" if task in CNN_TASKS else "mlp"


def preset_values(preset, arch, width="standard", hidden=None, task=None, method=None):
    """The preset's ``{"hidden": [...], "config": {...}, "method_options": {...}}`` for this run; ``hidden``
    (default: the preset's) sets how many values the per-layer fields get.

    Only the fields the preset sets are present; the others keep ``SpaceNetConfig``'s and the method's defaults.
    PresetError for an unknown preset, or ``tuned`` without tuned values for ``(task, method)``.
    """
    if preset not in PRESETS:
        raise PresetError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    values = paper(arch, width, hidden)
    if preset == "tuned":
        if (task, method) not in TUNED or arch != "mlp":
            known = ", ".join(f"--task {t} --method {m}" for t, m in sorted(TUNED)) or "none yet"
            raise PresetError(f"--preset tuned has no values for --task {task} --method {method} with this "
                              f"network (tuned: {known}, the paper's MLP)")
        values["config"].update(TUNED[(task, method)]["config"])
    return values


def paper(arch, width="standard", hidden=None):
    """The paper's values for the MLP (Sec. 5.1) or the CNN (Sec. 5.3.1)."""
    if arch == "cnn":
        hidden = list(hidden or [512])
        n_conv, n_hidden = len(CNN_WIDTHS[width]), len(hidden)
        return {"hidden": hidden, "method_options": {}, "config": {
            "connections_per_task": [0.12] * (n_conv + n_hidden + 1), "selected_neurons": [None] * (n_conv + n_hidden),
            "reserved_neurons": [2, 2, 5, 6] + [30] * n_hidden, "epochs": 20, "lr": 0.1, "init_fan": "connections"}}
    hidden = list(hidden or [400, 400])
    n_hidden = len(hidden)
    return {"hidden": hidden, "method_options": {}, "config": {
        "connections_per_task": [10000] + [1640] * (n_hidden - 1) + [80], "selected_neurons": [80] * n_hidden,
        "reserved_neurons": [40] * n_hidden, "epochs": 4, "lr": 0.01, "init_fan": "layer"}}


def describe():
    """Every preset's values as text lines, for ``--help``."""
    lines = []
    for arch in ("mlp", "cnn"):
        values = paper(arch)
        lines.append(f"paper ({arch}): hidden={values['hidden']}, " + format_config(values["config"]))
    for (task, method), tuned in sorted(TUNED.items()):
        lines.append(f"tuned (--task {task} --method {method}): paper (mlp) with " + format_config(tuned["config"]))
    return lines


def format_config(config):
    return ", ".join(f"{k}={v}" for k, v in config.items())
