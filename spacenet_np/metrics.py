"""Evaluation over a task stream: the accuracy matrix and the metrics computed from it.

``R[i][j]`` is the test accuracy in percent on task ``j`` after learning task ``i`` (``j <= i``); rows are lists of
growing length.
"""
import numpy as np


def accuracy(predictions, labels):
    """Percentage of ``predictions`` (n,) equal to ``labels`` (n,)."""
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    return 100.0 * float(np.mean(predictions == labels)) if labels.size else float("nan")


def evaluate_tasks(predict, tasks):
    """Accuracy on each task's test set with ``predict(images) -> classes``. Returns a list of floats (percent)."""
    return [accuracy(predict(task.x_test), np.asarray(task.y_test)) for task in tasks]


def final_average_accuracy(matrix):
    """ACC: the mean of the last row of the accuracy matrix."""
    return float(np.mean(matrix[-1]))


def backward_transfer(matrix):
    """BWT: mean over j < T of ``R[T][j] - R[j][j]`` (negative when old tasks are forgotten); 0 for one task."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return float(np.mean([matrix[last][j] - matrix[j][j] for j in range(last)]))


def average_forgetting(matrix):
    """Mean over old tasks of the best earlier accuracy minus the final accuracy; 0 for one task."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return float(np.mean([max(matrix[i][j] for i in range(j, last)) - matrix[last][j] for j in range(last)]))


def model_size(model):
    """Live parameters and their storage: ``{"parameters", "bytes"}``.

    Parameters are the live weights (9 per kernel in a convolution) plus the biases of the neurons that have state
    (slots) in hidden and output layers. Bytes count the CSR weights, column indices and row pointers, and those biases.
    """
    parameters, size = 0, 0
    for layer in model.layers:
        parameters += layer.weights.size + layer.bias.size
        size += layer.weights.nbytes + layer.indices.nbytes + layer.indptr.nbytes + layer.bias.nbytes
    return {"parameters": int(parameters), "bytes": int(size)}


def run_metrics(matrix):
    """Every metric of one run from its accuracy matrix ``R`` (list of rows of growing length)."""
    last = list(matrix[-1])
    return {
        "final_average_accuracy": final_average_accuracy(matrix),
        "backward_transfer": backward_transfer(matrix),
        "average_forgetting": average_forgetting(matrix),
        "final_per_task_accuracy": last,
        "final_per_task_std": float(np.std(last)),
    }
