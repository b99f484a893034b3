"""Shared helpers of the engine tests: synthetic data, a small config, and network snapshots.

The synthetic data are class-dependent Gaussian blobs mapped to uint8 "images": every class has a random
centre in pixel space, samples are the centre plus Gaussian noise, clipped to [0, 255]. Blobs far apart (small
``spread``) give an easy problem for the end-to-end tests; the property tests only need data to train on.
"""
import os

import numpy as np
from hypothesis import settings

from spacenet_np.layers import FREE
from spacenet_np.spacenet import SpaceNetConfig

# Under CI (CI=true) every hypothesis run draws the same examples, so a green run can be repeated; local runs keep
# exploring new examples. Test modules build their settings after this file loads, so they inherit the profile.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() not in ("", "0", "false") else "dev")


def make_blobs(n_classes, n_features, n_per_class, seed=0, spread=25.0, centre_seed=None):
    """Class-dependent Gaussian blobs as uint8 images.

    Returns (images (n_classes * n_per_class, n_features) uint8, labels (n,) int64), shuffled. The class
    centres depend only on ``centre_seed`` (default ``seed``), so train and test sets drawn with different
    ``seed`` and the same ``centre_seed`` come from the same distribution.
    """
    centre_rng = np.random.default_rng(seed if centre_seed is None else centre_seed)
    centres = centre_rng.uniform(30.0, 225.0, size=(n_classes, n_features))
    rng = np.random.default_rng(seed + 7919)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), n_per_class)
    pixels = centres[labels] + rng.normal(0.0, spread, size=(labels.size, n_features))
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    order = rng.permutation(labels.size)
    return images[order], labels[order]


def task_split(images, labels, classes):
    """The samples of ``images``/``labels`` whose label is in ``classes``."""
    keep = np.isin(labels, classes)
    return images[keep], labels[keep]


def tiny_config(**overrides):
    """A small SpaceNetConfig for a 16-40-4 network; keyword arguments override fields."""
    values = dict(connections_per_task=(120, 20), selected_neurons=(12,), reserved_neurons=(4,),
                  rewire_ratio=0.3, epochs=2, batch_size=16, lr=0.02)
    values.update(overrides)
    return SpaceNetConfig(**values)


def connection_table(model, layer_index):
    """Every connection of a layer keyed by (owner, out neuron id, in neuron id) -> (weight, importance).

    Keys use neuron ids (via ``slot_ids``), so they do not depend on the connection order in ``W.data``.
    """
    layer = model.layers[layer_index]
    out_ids = model.neurons[layer_index + 1].slot_ids[layer.rows]
    in_ids = model.neurons[layer_index].slot_ids[layer.indices]
    return {(int(o), int(r), int(c)): (layer.weights[k], layer.importance[k])
            for k, (o, r, c) in enumerate(zip(layer.owner, out_ids, in_ids))}


def reserved_ids(neurons):
    """Neuron ids of a NeuronIndex that are reserved, as a dict id -> task."""
    mask = neurons.reserved_by != FREE
    return dict(zip(neurons.slot_ids[mask].tolist(), neurons.reserved_by[mask].tolist()))
