"""SpaceNetClassifier: scikit-learn's estimator checks, class-incremental partial_fit, labels, inputs, parameters."""
import numpy as np
import pytest
from helpers import make_blobs
from sklearn.base import clone
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_fit_score_takes_y, parametrize_with_checks

from spacenet_np import SpaceNet, SpaceNetClassifier, SpaceNetConfig
from spacenet_np.network import SparseMLP

# A small network that learns scikit-learn's toy problems in one task: the checks need > 83 % on blobs.
SMALL = dict(hidden=(32,), selected_neurons=16, reserved_neurons=4, connections_per_task=(0.4, 16), epochs=20,
             lr=0.1, batch_size=16, config={"init_fan": "connections"}, random_state=0)

# The checks that cannot apply to a class-incremental learner, and why.
EXPECTED_FAILED_CHECKS = {
    "check_fit_score_takes_y": "it calls partial_fit(X, y) after fit(X, y) on the same classes; a class-incremental "
                               "learner refuses a task whose classes it has learned (every task brings new classes)",
}


@parametrize_with_checks([SpaceNetClassifier(**SMALL)], expected_failed_checks=lambda _: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_the_expected_failures_fail_for_their_reason():
    with pytest.raises(ValueError, match="were learned in an earlier task"):
        check_fit_score_takes_y("SpaceNetClassifier", SpaceNetClassifier(**SMALL))


@pytest.fixture(scope="module")
def blobs():
    """Four classes of uint8 blobs, 16 features: (x_train, y_train, x_test, y_test)."""
    x_train, y_train = make_blobs(4, 16, 40, seed=0)
    x_test, y_test = make_blobs(4, 16, 20, seed=1, centre_seed=0)
    return x_train, y_train, x_test, y_test


def small(**changes):
    """SMALL with fewer epochs, room in the first layer for several tasks, and statistics for uint8 blobs."""
    return SpaceNetClassifier(**{**SMALL, "epochs": 10, "connections_per_task": (0.25, 16), "input_mean": 0.5,
                                 "input_std": 0.25, **changes})


def test_partial_fit_learns_tasks_of_new_classes(blobs):
    x_train, y_train, x_test, y_test = blobs
    clf = small()
    first = y_train < 2
    clf.partial_fit(x_train[first], y_train[first], classes=[0, 1, 2, 3])
    assert set(clf.predict(x_test)) <= {0, 1} and clf.classes_.tolist() == [0, 1, 2, 3] and clf.n_features_in_ == 16
    proba = clf.predict_proba(x_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (proba[:, 2:] == 0).all()
    clf.partial_fit(x_train[~first], y_train[~first], classes=[3, 2, 1, 0])
    proba = clf.predict_proba(x_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(clf.classes_[proba.argmax(axis=1)], clf.predict(x_test))
    new = y_test >= 2
    assert clf.learner_.tasks_learned == 2 and clf.score(x_test[new], y_test[new]) > 0.9


@pytest.mark.parametrize("labels", [np.array(["cat", "dog", "eel", "fox"]), np.array([-5, 3, 10, 42])])
def test_any_labels_map_through_classes(blobs, labels):
    x_train, y_train, x_test, y_test = blobs
    clf = small().fit(x_train, labels[y_train])
    assert clf.classes_.tolist() == sorted(labels.tolist())
    indices = small().fit(x_train, y_train).predict(x_test)  # same seed, same order of classes: same network
    np.testing.assert_array_equal(clf.predict(x_test), labels[indices])


@pytest.mark.parametrize("call, message", [
    (lambda c, x, y: c.partial_fit(x, y), "classes must be given on the first call to partial_fit"),
    (lambda c, x, y: c.partial_fit(x, y, classes=[0, 1]), r"y holds labels \[2, 3\] that are not among the classes"),
    (lambda c, x, y: c.fit(x, y).partial_fit(x[y == 1], y[y == 1]), r"classes \[1\] of y were learned in an earlier"),
    (lambda c, x, y: c.partial_fit(x[y == 1], y[y == 1], classes=[0, 1, 2, 3]).partial_fit(x, y, classes=[0, 1]),
     r"differs from the classes of the first call \[0, 1, 2, 3\]"),
    (lambda c, x, y: c.set_params(method="nope").fit(x, y), "unknown method 'nope'; known methods: ewc, finetune"),
    (lambda c, x, y: c.set_params(method_options={"ewc_lambda": 1.0}).fit(x, y),
     "method 'spacenet' has no option ewc_lambda"),
    (lambda c, x, y: c.set_params(config={"lr": 0.1}).fit(x, y), "config sets lr: use the parameters"),
    (lambda c, x, y: c.set_params(config={"init_fan": "x"}).fit(x, y), "init_fan='x' must be one of"),
    (lambda c, x, y: c.set_params(hidden=32).fit(x, y), "hidden=32 must be a non-empty tuple"),
    (lambda c, x, y: c.set_params(random_state=-1).fit(x, y), "random_state=-1 must be >= 0"),
    (lambda c, x, y: c.set_params(selected_neurons=40).fit(x, y), r"selected_neurons\[0\]=40 must be in \[1, 32\]"),
])
def test_bad_calls_name_the_problem_and_change_nothing(blobs, call, message):
    x_train, y_train, _, _ = blobs
    clf = small()
    with pytest.raises(ValueError, match=message):
        call(clf, x_train, y_train)


def test_a_refused_task_leaves_the_model_as_it_was(blobs):
    x_train, y_train, x_test, _ = blobs
    clf = small().partial_fit(x_train[y_train == 0], y_train[y_train == 0], classes=[0, 1, 2, 3])
    before = clf.predict_proba(x_test)
    with pytest.raises(ValueError, match="learned in an earlier task"):
        clf.partial_fit(x_train[y_train < 2], y_train[y_train < 2])
    np.testing.assert_array_equal(clf.predict_proba(x_test), before)


def test_uint8_standardization_is_the_learners(blobs):
    x_train, y_train, x_test, _ = blobs
    mean, std = 0.45, 0.2
    clf = small(input_mean=mean, input_std=std).fit(x_train, y_train)
    config = SpaceNetConfig(connections_per_task=(0.25, 16), selected_neurons=(16,), reserved_neurons=(4,), epochs=10,
                            lr=0.1, batch_size=16, init_fan="connections")
    learner = SpaceNet(SparseMLP(16, [32], 4), config, seed=0, input_mean=mean, input_std=std)
    learner.learn(x_train, y_train, [0, 1, 2, 3])
    np.testing.assert_array_equal(clf.predict(x_test), learner.predict(x_test))
    floats = small(input_mean=123.0, input_std=9.0).fit((x_train / 255 - mean) / std, y_train)  # floats: as they are
    np.testing.assert_allclose(floats.predict_proba((x_test / 255 - mean) / std), clf.predict_proba(x_test),
                               atol=1e-4)


def test_integer_inputs_are_float_values(blobs):
    x_train, y_train, x_test, _ = blobs
    as_int = small().fit(x_train.astype(np.int64), y_train)
    as_float = small().fit(x_train.astype(np.float64), y_train)
    np.testing.assert_array_equal(as_int.predict_proba(x_test.astype(np.int64)), as_float.predict_proba(x_test * 1.0))


def test_fit_starts_over_and_random_state_fixes_the_result(blobs):
    x_train, y_train, x_test, _ = blobs
    clf = small().partial_fit(x_train[y_train < 2], y_train[y_train < 2], classes=[0, 1, 2, 3])
    refit = clf.fit(x_train, y_train)
    assert refit.learner_.tasks_learned == 1
    np.testing.assert_array_equal(refit.predict_proba(x_test), small().fit(x_train, y_train).predict_proba(x_test))
    drawn = small(random_state=None).fit(x_train, y_train)
    again = small(random_state=drawn.seed_).fit(x_train, y_train)
    np.testing.assert_array_equal(drawn.predict_proba(x_test), again.predict_proba(x_test))


def test_parameters_reach_the_learner_and_clone_keeps_them(blobs):
    x_train, y_train, _, _ = blobs
    clf = SpaceNetClassifier(method="ewc", hidden=(24, 12), connections_per_task=10, epochs=1, lr=0.02,
                             method_options={"ewc_lambda": 7.0}, config={"softmax_scope": "seen"}, random_state=3)
    twin = clone(clf)
    assert twin.get_params() == clf.get_params() and twin.method_options is not clf.method_options
    twin.set_params(rewire_ratio=0.1).partial_fit(x_train[y_train == 0], y_train[y_train == 0], classes=[0, 1, 2, 3])
    learner = twin.learner_
    assert learner.ewc_lambda == 7.0 and learner.total_tasks == 4  # 4 classes, 1 in the first task
    assert learner.config.connections_per_task == (10, 10, 10) and learner.config.softmax_scope == "seen"
    assert (learner.config.epochs, learner.config.lr, learner.config.rewire_ratio) == (1, 0.02, 0.1)
    assert [layer.out_index.width for layer in learner.model.layers] == [24, 12, 4]


def test_default_connections_scale_the_papers_input_layer(blobs):
    x_train, y_train, _, _ = blobs
    clf = SpaceNetClassifier(epochs=1, random_state=0).fit(x_train, y_train)
    assert clf.learner_.config.connections_per_task == (round(10000 * 16 / 784), 1640, 80)
    assert clf.learner_.config.selected_neurons == (80, 80) and clf.learner_.config.reserved_neurons == (40, 40)


def test_pipeline_and_cross_val_score():
    x, y = make_blobs(3, 8, 30, seed=2)
    pipeline = make_pipeline(StandardScaler(), SpaceNetClassifier(**SMALL))
    scores = cross_val_score(pipeline, x.astype(np.float64), y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.9
