"""``SpaceNetClassifier``: SpaceNet (or any method of ``METHODS``) as a scikit-learn estimator.

Needs scikit-learn (``pip install "spacenet_np[sklearn]"``)::

    clf = SpaceNetClassifier(random_state=0)
    clf.partial_fit(X1, y1, classes=[0, 1, 2, 3])   # task 1: the classes of y1; `classes` fixes the output layer
    clf.partial_fit(X2, y2)                         # task 2: new classes only (class-incremental)
    clf.predict(X), clf.predict_proba(X), clf.score(X, y)

- ``partial_fit(X, y, classes=None)`` learns one task: the classes present in ``y`` are the task's and must be new.
  ``classes`` (every class the model will ever see) is required on the first call, as in scikit-learn's other
  incremental estimators; later calls may repeat it unchanged.
- ``fit(X, y)`` starts over and learns one task with every class of ``y``: the single-task use that ``Pipeline``
  and ``cross_val_score`` expect.
- Labels may be anything sortable (strings, non-contiguous integers): ``classes_`` holds them sorted, and class
  ``classes_[i]`` is output unit ``i``.
- Inputs: uint8 features are pixels, standardized as ``(x / 255 - input_mean) / input_std`` (give your data's
  statistics, e.g. a stream's ``mean`` and ``std``, or per-feature arrays); float features are used as they are
  (standardize them yourself, e.g. with a ``StandardScaler`` in a ``Pipeline``); other numbers (ints, bools) are
  used as float values.
- ``predict_proba`` is the softmax over the classes learned so far; the other columns are 0.
- Hyperparameters: the network is an MLP with ``hidden`` widths; ``connections_per_task``, ``selected_neurons``
  and ``reserved_neurons`` (None: the paper's values, ``presets.paper``, with the input layer's 10000 connections
  per 784 features scaled to ``n_features``), ``epochs``, ``batch_size``, ``lr`` and ``rewire_ratio`` are the
  ``SpaceNetConfig`` fields of the same names; ``config`` (a dict) sets any other field. ``method_options`` (a dict)
  holds the method's declared options; an option filled from the stream (``total_tasks``) defaults to
  ceil(n_classes / classes of the first task).
- ``random_state``: an int is the learner's seed (as the CLI's ``--seeds``); None draws a fresh one, kept in
  ``seed_``.

The fitted learner is ``learner_`` (save it with ``checkpoint.save_learner``).
"""
import math

import numpy as np

try:
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as err:  # scikit-learn is an optional dependency
    raise ImportError(f"SpaceNetClassifier needs scikit-learn >= 1.6: pip install 'spacenet_np[sklearn]' ({err})") \
        from None

from . import presets
from .experiment import CONFIG_OPTIONS, broadcast
from .methods import METHODS
from .network import SparseMLP
from .options import check_options, method_options
from .spacenet import SpaceNetConfig

PAPER_INPUT_CONNECTIONS, PAPER_FEATURES = 10000, 784  # the paper's first layer: 10000 connections per task, 784 px
NAMED_FIELDS = ("connections_per_task", "selected_neurons", "reserved_neurons", "epochs", "batch_size", "lr",
                "rewire_ratio")
PREDICT_BATCH = 1000


class SpaceNetClassifier(ClassifierMixin, BaseEstimator):
    """A class-incremental SpaceNet classifier with scikit-learn's API (see the module docstring).

    Parameters: ``method`` (a name of ``METHODS``, plugins included), ``hidden`` (tuple of hidden widths), the
    config fields ``connections_per_task``, ``selected_neurons``, ``reserved_neurons`` (None: the paper's; a single
    value applies to every layer), ``epochs``, ``batch_size``, ``lr``, ``rewire_ratio``, ``config`` (dict of other
    ``SpaceNetConfig`` fields), ``method_options`` (dict), ``input_mean``/``input_std`` (uint8 standardization:
    floats or (n_features,) arrays) and ``random_state``.

    Attributes after fitting: ``classes_`` (n_classes,), ``n_features_in_``, ``learner_`` and ``seed_``.
    """

    def __init__(self, method="spacenet", hidden=(400, 400), connections_per_task=None, selected_neurons=None,
                 reserved_neurons=None, epochs=4, batch_size=128, lr=0.01, rewire_ratio=0.2, config=None,
                 method_options=None, input_mean=0.0, input_std=1.0, random_state=None):
        self.method = method
        self.hidden = hidden
        self.connections_per_task = connections_per_task
        self.selected_neurons = selected_neurons
        self.reserved_neurons = reserved_neurons
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.rewire_ratio = rewire_ratio
        self.config = config
        self.method_options = method_options
        self.input_mean = input_mean
        self.input_std = input_std
        self.random_state = random_state

    # ----- learning -----
    def fit(self, X, y):
        """Forget everything and learn one task with every class of ``y``. X (n, n_features), y (n,). Returns self."""
        for name in ("learner_", "classes_", "seed_"):
            self.__dict__.pop(name, None)
        return self._learn(X, y, None, every_class=True)

    def partial_fit(self, X, y, classes=None):
        """Learn one task: the classes present in ``y`` (n,), which must be new, from X (n, n_features).

        ``classes`` (every class the model will learn) is required on the first call and fixes the output layer;
        later calls may repeat it unchanged. Returns self. On an error nothing changes.
        """
        if not self.__sklearn_is_fitted__() and classes is None:
            raise ValueError("classes must be given on the first call to partial_fit: every class the model will "
                             "ever learn (it fixes the output layer)")
        return self._learn(X, y, classes, every_class=False)

    def _learn(self, X, y, classes, every_class):
        """Validate, build the learner on the first task, and learn the task of (X, y)."""
        first = not self.__sklearn_is_fitted__()
        X, y = validate_data(self, X, y, reset=first, dtype="numeric")
        check_classification_targets(y)
        if every_class:
            classes = np.unique(y)
        all_classes = self._check_classes(classes, first)
        index = encode(y, all_classes, "y")
        task = np.unique(index)
        if first:
            seed = self._seed()
            learner = self._new_learner(X.shape[1], all_classes.size, task.size, seed)
        else:
            learner, seed = self.learner_, self.seed_
            learned = task[learner.model.known_classes[task]]
            if learned.size:
                raise ValueError(f"classes {all_classes[learned].tolist()} of y were learned in an earlier task: "
                                 f"every partial_fit call must bring new classes (class-incremental learning); "
                                 f"fit starts over")
        learner.learn(as_features(X), index, task)
        self.learner_, self.classes_, self.seed_ = learner, all_classes, seed
        return self

    def _check_classes(self, classes, first):
        """The sorted classes (n_classes,): ``classes`` on the first call, ``classes_`` afterwards."""
        if not first:
            if classes is not None and not np.array_equal(np.unique(np.asarray(classes)), self.classes_):
                raise ValueError(f"classes={list(classes)!r} differs from the classes of the first call "
                                 f"{self.classes_.tolist()}; the output layer is fixed")
            return self.classes_
        classes = np.asarray(classes)
        if classes.ndim != 1 or classes.size == 0:
            raise ValueError(f"classes must be a non-empty list of labels, got shape {classes.shape}")
        check_classification_targets(classes)
        return np.unique(classes)

    def _seed(self):
        """The learner's seed: ``random_state`` if it is an int, else drawn from it (None: fresh entropy)."""
        state = self.random_state
        if isinstance(state, (int, np.integer)) and not isinstance(state, bool):
            if state < 0:
                raise ValueError(f"random_state={state} must be >= 0 (it is the learner's seed)")
            return int(state)
        if state is None:
            return int(np.random.default_rng().integers(2**63))
        return int(check_random_state(state).randint(np.iinfo(np.int32).max))

    def _new_learner(self, n_features, n_classes, first_task_size, seed):
        """The learner of ``method`` on a fresh MLP n_features -> hidden -> n_classes; ValueError naming a bad
        hyperparameter."""
        if self.method not in METHODS:
            raise ValueError(METHODS.unknown(self.method))
        cls = METHODS[self.method]
        hidden = check_hidden(self.hidden)
        config = SpaceNetConfig(**self._config_values(n_features, hidden))
        options = check_options(method_options(cls), dict(self.method_options or {}), f"method {self.method!r}")
        for option in cls.OPTIONS:  # the CLI fills these from the stream; here the first task tells
            if option.from_stream == "n_tasks" and options[option.name] is None:
                options[option.name] = math.ceil(n_classes / first_task_size)
        model = SparseMLP(n_features, hidden, n_classes)
        return cls(model, config, seed=seed, input_mean=self.input_mean, input_std=self.input_std, **options)

    def _config_values(self, n_features, hidden):
        """Every SpaceNetConfig field, checked: the paper's values, the named parameters, then ``config``."""
        base = presets.paper("mlp", hidden=hidden)["config"]
        base["connections_per_task"][0] = max(1, round(PAPER_INPUT_CONNECTIONS * n_features / PAPER_FEATURES))
        named = {name: getattr(self, name) for name in NAMED_FIELDS if getattr(self, name) is not None}
        extra = dict(self.config or {})
        overlap = sorted(set(extra) & set(NAMED_FIELDS))
        if overlap:
            raise ValueError(f"config sets {', '.join(overlap)}: use the parameters of the same names instead")
        values = {**base, **broadcast({**named, **extra}, base)}
        return check_options(CONFIG_OPTIONS, values, "SpaceNetClassifier's config")

    # ----- prediction -----
    def predict(self, X):
        """The predicted label per sample of X (n, n_features): one of the classes learned so far. (n,)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype="numeric")
        return self.classes_[self.learner_.predict(as_features(X), PREDICT_BATCH)]

    def predict_proba(self, X):
        """Class probabilities (n, n_classes), columns as ``classes_``: the softmax over the classes learned so
        far (each row sums to 1), 0 for the classes not learned yet."""
        check_is_fitted(self)
        X = as_features(validate_data(self, X, reset=False, dtype="numeric"))
        learner = self.learner_
        known = np.flatnonzero(learner.model.known_classes)
        proba = np.zeros((X.shape[0], self.classes_.size))
        for start in range(0, X.shape[0], PREDICT_BATCH):
            ids = np.arange(start, min(start + PREDICT_BATCH, X.shape[0]))
            logits = learner.model.logits(learner.input_batch(X, ids))[known].astype(np.float64)
            exp = np.exp(logits - logits.max(axis=0))
            proba[np.ix_(ids, known)] = (exp / exp.sum(axis=0)).T
        return proba

    def __sklearn_is_fitted__(self):
        return hasattr(self, "learner_")


def check_hidden(hidden):
    """``hidden`` as a list of widths >= 1; ValueError otherwise."""
    if not isinstance(hidden, (list, tuple)) or not hidden or not all(
            isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise ValueError(f"hidden={hidden!r} must be a non-empty tuple of hidden-layer widths >= 1")
    return [int(h) for h in hidden]


def encode(y, classes, name):
    """Output-unit indices (n,) int64 of the labels ``y`` in the sorted ``classes``; ValueError naming labels
    outside them."""
    try:
        index = np.searchsorted(classes, y)
    except TypeError:
        raise ValueError(f"{name} holds labels of type {y.dtype}, the classes are {classes.dtype}") from None
    inside = index < classes.size
    inside[inside] = classes[index[inside]] == y[inside]
    if not inside.all():
        raise ValueError(f"{name} holds labels {np.unique(y[~inside]).tolist()} that are not among the classes "
                         f"{classes.tolist()}")
    return index.astype(np.int64)


def as_features(X):
    """uint8 (pixels) and floats as they are; other numbers (ints, bools) as float32 values. X (n, n_features)."""
    if X.dtype == np.uint8 or np.issubdtype(X.dtype, np.floating):
        return X
    return X.astype(np.float32)
