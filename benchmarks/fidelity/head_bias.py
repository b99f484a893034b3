"""Where the bias towards a task sits (issue 11, section 4): after each task, each learned task's head (its output
weights' L2 norm, its class biases) and the mean logit of its classes over the validation images of every task
learned so far, with and without ``balance_heads="norm"``. Also the share of validation predictions that go to each
task's classes after the last task. Validation data only (10 % of each task's training images, fixed split).

    SPACENET_DATA=../shared/data python -m benchmarks.fidelity.head_bias [--seeds 0 1 2 3 4]
"""
import argparse
import sys

import numpy as np

from benchmarks.common import machine_info, md_table, reproduce_command, write_results
from spacenet_np import experiment
from spacenet_np.spacenet import head_statistics

TASKS = ("split_mnist", "split_fashion_mnist")


def trace(task, seed, balance):
    """Per task learned: the head statistics of every learned task, and the final prediction shares."""
    spec = experiment.make_spec(task, seed=seed, validation=0.1, config={"balance_heads": balance})
    stream, val_tasks, _, model, config = experiment.prepare(spec)
    learner = experiment.new_learner(spec, stream, model, config)
    steps = []
    for t, train_task in enumerate(stream.tasks):
        learner.learn(train_task.x_train, train_task.y_train, train_task.classes)
        images = np.concatenate([v.x_test for v in val_tasks[:t + 1]])
        steps.append(head_statistics(learner, images))
    images = np.concatenate([v.x_test for v in val_tasks])
    labels = np.concatenate([v.y_test for v in val_tasks])
    predicted = learner.predict(images)
    shares = [float(np.isin(predicted, v.classes).mean()) for v in val_tasks]
    accuracy = float((predicted == labels).mean() * 100)
    return {"steps": steps, "prediction_shares": shares, "val_accuracy": accuracy}


def summarize(traces):
    """Mean over seeds, after the last task: per task head norm, mean logit and prediction share."""
    last = [tr["steps"][-1] for tr in traces]
    n_tasks = len(last[0])
    return {"weight_norm": [float(np.mean([s[t]["weight_norm"] for s in last])) for t in range(n_tasks)],
            "mean_logit": [float(np.mean([s[t]["mean_logit"] for s in last])) for t in range(n_tasks)],
            "bias_mean": [float(np.mean([s[t]["bias_mean"] for s in last])) for t in range(n_tasks)],
            "prediction_share": [float(np.mean([tr["prediction_shares"][t] for tr in traces]))
                                 for t in range(n_tasks)],
            "val_accuracy": [tr["val_accuracy"] for tr in traces]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = p.parse_args(argv)
    machine = machine_info()
    payload, rows = {"seeds": args.seeds, "results": {}}, []
    for task in TASKS:
        for balance in ("none", "norm"):
            traces = [trace(task, seed, balance) for seed in args.seeds]
            summary = summarize(traces)
            payload["results"][f"{task}/{balance}"] = {"traces": traces, "summary": summary}
            fmt = lambda values, d=2: " / ".join(f"{v:.{d}f}" for v in values)  # noqa: E731
            rows.append([task, balance, fmt(summary["weight_norm"]), fmt(summary["mean_logit"]),
                         fmt([100 * s for s in summary["prediction_share"]], 1),
                         f"{np.mean(summary['val_accuracy']):.2f}"])
            print(rows[-1], flush=True)
    table = md_table(["stream", "balance_heads", "head weight norm, tasks 1-5", "mean logit of the task's classes",
                      "% of predictions per task (20 % each is balanced)", "val accuracy"], rows)
    markdown = (f"# Where the bias sits: heads after the last task (validation data, mean over seeds "
                f"{' '.join(map(str, args.seeds))})\n\n{table}")
    write_results("fidelity/head_bias", payload, markdown, reproduce_command("fidelity.head_bias",
                                                                             argv or sys.argv[1:]), machine)
    print(markdown)


if __name__ == "__main__":
    main()
