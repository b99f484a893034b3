"""spacenet_np: truly sparse SpaceNet continual learning on the CPU (NumPy, SciPy, Numba).

A notebook needs only this::

    from spacenet_np import SparseMLP, SpaceNet, SpaceNetConfig, get_stream
    stream = get_stream("split_mnist")
    model = SparseMLP(stream.n_features, [400, 400], stream.n_classes)
    learner = SpaceNet(model, SpaceNetConfig(), seed=0, input_mean=stream.mean, input_std=stream.std)
    for task in stream.tasks:
        learner.learn(task.x_train, task.y_train, task.classes)
    predictions = learner.predict(stream.tasks[0].x_test)

The paper's CNN for the CIFAR streams is ``SparseCNN(stream.image_shape, (32, 32, 64, 64), (512,),
stream.n_classes)`` with per-channel statistics ``input_mean=stream.feature_mean, input_std=stream.feature_std``
(see ``python -m spacenet_np.train --task split_cifar10`` for its configuration).

Your own data: ``make_stream(x_train, y_train, x_test, y_test, classes_per_task=2)`` (see ``npz_stream``).
scikit-learn users: ``SpaceNetClassifier`` (needs scikit-learn; see ``estimator``).
"""
from .checkpoint import CheckpointError, load, predict_from_checkpoint, restore_learner, save_learner, save_model
from .methods import EWC, METHODS, FineTune, Joint, SpaceNetRehearsal
from .metrics import average_forgetting, backward_transfer, evaluate_tasks, final_average_accuracy
from .network import SparseCNN, SparseMLP, build_network
from .npz_stream import make_stream
from .spacenet import SpaceNet, SpaceNetConfig, StaticSparseNN, TrainingDiverged, predict
from .streams import get_stream

__all__ = ["load", "save_model", "save_learner", "restore_learner", "predict_from_checkpoint", "CheckpointError",
           "METHODS", "SpaceNetRehearsal", "FineTune", "Joint", "EWC", "SparseMLP", "SparseCNN", "build_network",
           "SpaceNet", "SpaceNetConfig", "StaticSparseNN", "TrainingDiverged", "predict",
           "get_stream", "make_stream", "evaluate_tasks", "final_average_accuracy", "backward_transfer",
           "average_forgetting"]  # SpaceNetClassifier is left out: ``import *`` must work without scikit-learn


def __getattr__(name):
    """``SpaceNetClassifier``, imported on first use: scikit-learn is an optional dependency."""
    if name == "SpaceNetClassifier":
        from .estimator import SpaceNetClassifier
        return SpaceNetClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
__version__ = "0.1.0"
