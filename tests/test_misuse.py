"""API misuse is refused with a message that names the problem, before anything changes: predicting before any
task, tasks without samples, with classes learned before or without samples; a loss that explodes without
becoming inf counts as divergence."""
import re

import numpy as np
import pytest
from helpers import make_blobs, task_split, tiny_config

from spacenet_np import checkpoint
from spacenet_np.methods import EWC, FineTune, Joint, SpaceNetRehearsal
from spacenet_np.network import SparseMLP
from spacenet_np.spacenet import SpaceNet, StaticSparseNN, TrainingDiverged
from spacenet_np.strategy import diverged_loss, predict

LEARNERS = [SpaceNet, StaticSparseNN, SpaceNetRehearsal, FineTune, Joint, EWC]


@pytest.fixture(scope="module")
def blobs():
    return make_blobs(6, 16, 20, seed=0)


def new_learner(cls=SpaceNet):
    options = {"total_tasks": 3} if cls in (FineTune, Joint, EWC) else {}
    return cls(SparseMLP(16, [40], 6), tiny_config(), seed=0, **options)


def network_arrays(model):
    return [a.copy() for layer in model.layers for a in (layer.weights, layer.rows, layer.indices)] + [
        model.known_classes.copy()] + [n.bias.copy() for n in model.neurons]


def assert_unchanged(model, before):
    after = network_arrays(model)
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))


# ----- predicting before any task -----
def test_predict_before_any_task_is_refused(blobs, tmp_path):
    images, _ = blobs
    learner = new_learner()
    with pytest.raises(ValueError, match="no task has been learned yet"):
        learner.predict(images)
    with pytest.raises(ValueError, match="no task has been learned yet"):
        predict(learner.model, images, 0.0, 1.0)
    path = checkpoint.save_model(tmp_path / "untrained.npz", learner.model, 0.0, 1.0)
    with pytest.raises(ValueError, match="no task has been learned yet"):
        checkpoint.predict_from_checkpoint(path, images)


def test_predict_after_a_task_gives_only_its_classes(blobs):
    images, labels = blobs
    learner = new_learner()
    learner.learn(*task_split(images, labels, [0, 1]), [0, 1])
    assert set(np.unique(learner.predict(images)).tolist()) <= {0, 1}


# ----- learning misuse -----
@pytest.mark.parametrize("cls", LEARNERS, ids=lambda c: c.name)
def test_a_task_without_samples_is_refused(cls):
    learner = new_learner(cls)
    before = network_arrays(learner.model)
    with pytest.raises(ValueError, match="0 samples"):
        learner.learn(np.zeros((0, 16), np.uint8), np.zeros(0, np.int64), [0, 1])
    assert_unchanged(learner.model, before)
    assert learner.tasks_learned == 0


@pytest.mark.parametrize("cls", LEARNERS, ids=lambda c: c.name)
def test_classes_learned_in_an_earlier_task_are_refused(cls, blobs):
    """Replay methods train old classes from their buffer, but a task's own classes must be new."""
    images, labels = blobs
    learner = new_learner(cls)
    learner.learn(*task_split(images, labels, [0, 1]), [0, 1])
    before = network_arrays(learner.model)
    with pytest.raises(ValueError, match=re.escape("classes [1] were learned in an earlier task")):
        learner.learn(*task_split(images, labels, [1, 2]), [1, 2])
    assert_unchanged(learner.model, before)
    assert learner.tasks_learned == 1
    learner.learn(*task_split(images, labels, [2, 3]), [2, 3])  # new classes are fine, replay or not
    assert learner.tasks_learned == 2


@pytest.mark.parametrize("cls", LEARNERS, ids=lambda c: c.name)
def test_classes_without_samples_are_refused(cls, blobs):
    images, labels = blobs
    learner = new_learner(cls)
    before = network_arrays(learner.model)
    with pytest.raises(ValueError, match=re.escape("classes [2, 5] have no sample in labels")):
        learner.learn(*task_split(images, labels, [0, 1]), [0, 1, 2, 5])
    assert_unchanged(learner.model, before)
    assert not learner.model.known_classes.any()


# ----- divergence without inf -----
def test_a_finite_but_exploding_loss_counts_as_divergence():
    """Inputs of 1e33 give logits near 1e35: finite, far beyond any sane cross-entropy (O(log C))."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 16)).astype(np.float32) * np.float32(1e33)
    labels = rng.integers(0, 2, size=64)
    learner = new_learner()
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged, match=r"lr=0\.02") as info:
        learner.learn(images, labels, [0, 1])
    loss = float(re.search(r"loss became (\S+) in task 0, epoch 0, batch 0", str(info.value)).group(1))
    assert np.isfinite(loss) and loss > diverged_loss(6)
    assert learner.tasks_learned == 0 and learner.model.connection_counts() == [0, 0]


def test_the_divergence_threshold_is_far_above_a_sane_loss():
    assert diverged_loss(2) == pytest.approx(1e4 * np.log(2))
    assert diverged_loss(10) == pytest.approx(1e4 * np.log(10)) and diverged_loss(1) == diverged_loss(2)
