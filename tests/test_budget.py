"""``check_budget`` against real runs: it refuses a budget exactly when learning the tasks must fail.

Learning draws neurons and connection positions at random, and earlier tasks' connections may crowd a later
block by chance, so the comparison is exact where no old connection can be in a later block (every target
reserved, or nothing reserved under selection None) and one-sided elsewhere: a refused budget fails in every run
(at that task and layer, or earlier by chance), an accepted one fails only by chance (a block large enough on
paper but crowded by old connections).
"""
import re

import numpy as np
import pytest
from helpers import make_blobs, task_split
from hypothesis import event, given, settings
from hypothesis import strategies as st

from spacenet_np.network import SparseCNN, SparseMLP
from spacenet_np.spacenet import SpaceNet, SpaceNetConfig, check_budget

SELECTION = re.compile(r"selected_neurons\[(\d+)\].*before task (\d+)")
CONNECTIONS = re.compile(r"connections_per_task\[(\d+)\]")
RUN_BLOCK = re.compile(r"between the (\d+) x (\d+) selected neurons")


@st.composite
def budgets(draw):
    """A small MLP, a valid config and a number of tasks; ``exact``: no old connection can be in a later block."""
    n_tasks, per_task = draw(st.integers(1, 4)), draw(st.integers(1, 2))
    n_features = draw(st.integers(3, 10))
    widths = [draw(st.integers(2, 12)) for _ in range(draw(st.integers(1, 2)))]
    exact = draw(st.booleans())
    selected, reserved, sources = [], [], [n_features]
    for width in widths:
        sel = draw(st.one_of(st.none(), st.integers(1, width)))
        top = width if sel is None else sel
        spec = (0 if sel is None else sel) if exact else draw(st.integers(0, top))
        selected.append(sel)
        reserved.append(spec)
        sources.append(top)
    rows = [width if sel is None else sel for width, sel in zip(widths, selected)] + [per_task]
    counts = tuple(draw(st.integers(1, int(1.3 * r * s) + 1)) for r, s in zip(rows, sources))
    config = SpaceNetConfig(connections_per_task=counts, selected_neurons=tuple(selected),
                            reserved_neurons=tuple(reserved), rewire_ratio=draw(st.sampled_from([0.0, 0.3])),
                            epochs=2, batch_size=8, lr=0.02)
    model = SparseMLP(n_features, widths, per_task * n_tasks)
    return model, config, n_tasks, per_task, exact


def first_failure(action):
    """(task, kind, index, message) of the ValueError ``action`` raises, or None. Kinds sort as allocate fails:
    selection (0) before connections (1)."""
    try:
        action()
    except ValueError as err:
        message = str(err)
        selection, connections = SELECTION.search(message), CONNECTIONS.search(message)
        if selection:
            return int(selection.group(2)), 0, int(selection.group(1)), message
        task = re.search(r"task (\d+)", message)
        return (int(task.group(1)) if task else None), 1, int(connections.group(1)), message
    return None


def learn(model, config, n_tasks, per_task, seed):
    """Learn the tasks one by one on tiny blobs; returns the failure like ``first_failure``, with its task."""
    images, labels = make_blobs(per_task * n_tasks, model.n_features, 4, seed=seed)
    learner = SpaceNet(model, config, seed=seed)
    for t in range(n_tasks):
        classes = np.arange(per_task * t, per_task * (t + 1))
        failure = first_failure(lambda: learner.learn(*task_split(images, labels, classes), classes))
        if failure is not None:
            return (t, *failure[1:])
    return None


@settings(max_examples=120, deadline=None)
@given(case=budgets(), seed=st.integers(0, 2**16))
def test_check_budget_refuses_exactly_the_budgets_that_fail(case, seed):
    model, config, n_tasks, per_task, exact = case
    checked = first_failure(lambda: check_budget(model, config, n_tasks))
    assert sum(n.n_slots for n in model.neurons[1:-1]) == 0 and model.connection_counts() == [0] * len(model.layers)
    ran = learn(model, config, n_tasks, per_task, seed)
    event(f"exact={exact} refused={checked is not None} failed={ran is not None}")
    if exact:
        assert (checked is None) == (ran is None), (checked, ran)
        if checked is not None:
            assert checked[:3] == ran[:3], (checked, ran)
        return
    if checked is not None:  # impossible whatever the draws: this run fails there, or earlier by chance
        assert ran is not None and ran[:3] <= checked[:3], (checked, ran)
    if ran is not None and (checked is None or ran[:3] < checked[:3]):  # by chance: a crowded block, never a
        assert ran[1] == 1, ran                                         # selection or a too small block
        cols, rows = map(int, RUN_BLOCK.search(ran[3]).groups())
        assert cols * rows >= config.connections_per_task[ran[2]], ran


def test_check_budget_names_parameter_layer_and_task():
    model = SparseMLP(784, [400, 400], 10)
    check_budget(model, SpaceNetConfig(), 5)  # the paper's split MNIST budget fits
    with pytest.raises(ValueError, match=r"selected_neurons\[0\]=80 exceeds the 40 free .* before task 9"):
        check_budget(model, SpaceNetConfig(selected_neurons=(80, 80), reserved_neurons=(40, 10)), 10, 1)
    with pytest.raises(ValueError, match=r"connections_per_task\[2\]=170 cannot fit layer 2 in task 0"):
        check_budget(model, SpaceNetConfig(connections_per_task=(10000, 1640, 170)), 5)
    assert model.connection_counts() == [0, 0, 0] and model.neurons[1].n_slots == 0  # nothing changed


@pytest.mark.parametrize("n_tasks, reserved, fails_at", [(2, (0, 0, 2), None), (3, (0, 0, 2), (2, 0, 2)),
                                                       (3, (0, 0, 1), (2, 1, 0))])
def test_check_budget_on_a_cnn_with_every_map_selected(n_tasks, reserved, fails_at):
    """Selection None (the paper's CNN): every free map is a target, every map (reserved too) a source. Layer 0
    has 2 kernel positions (1 input channel x 2 maps) for 1 kernel per task; the hidden layer 4 neurons."""
    config = SpaceNetConfig(connections_per_task=(1, 1, 4, 2), selected_neurons=(None, None, None),
                            reserved_neurons=reserved, epochs=1, batch_size=8, lr=0.01, init_fan="connections")
    model = SparseCNN((1, 4, 4), (2, 2), (4,), 2 * n_tasks)
    checked = first_failure(lambda: check_budget(model, config, n_tasks))
    ran = learn(model, config, n_tasks, 2, seed=3)
    assert (checked is None) == (fails_at is None) == (ran is None), (checked, ran)
    if fails_at is not None:
        assert checked[:3] == ran[:3] == fails_at, (checked, ran)


@pytest.mark.parametrize("output_count, refused", [(8, False), (9, True)])
def test_reserved_neurons_still_feed_the_next_layer_under_selection_none(output_count, refused):
    """4 hidden neurons, selection None, 2 reserved per task: at task 1 the output block is still 4 sources (2 of
    them reserved) x 2 classes = 8 positions."""
    config = SpaceNetConfig(connections_per_task=(2, output_count), selected_neurons=(None,), reserved_neurons=(2,),
                            epochs=1, batch_size=8, lr=0.02)
    model = SparseMLP(4, [4], 4)
    checked = first_failure(lambda: check_budget(model, config, 2))
    ran = learn(model, config, 2, 2, seed=0)
    assert (checked is not None) == (ran is not None) == refused, (checked, ran)
    if refused:
        assert checked[:3] == ran[:3] == (0, 1, 1)
