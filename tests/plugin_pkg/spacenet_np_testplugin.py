"""A plugin method for the tests: fine-tuning whose steps shrink by ``decay`` after every task.

It has a declared option (``decay``), reuses a built-in declaration (``total_tasks``), and has training state
beyond the model (``class_counts``, the training samples seen per class), so a checkpoint must carry all three.
"""
import numpy as np

from spacenet_np.methods import TOTAL_TASKS, FineTune
from spacenet_np.options import Option


class DecayFineTune(FineTune):
    """FineTune with every gradient scaled by ``decay ** tasks_learned``."""

    name = "decay_finetune"
    OPTIONS = (TOTAL_TASKS, Option("decay", float, 0.5, "step factor per finished task", low=0.0, high=1.0,
                                   low_open=True))

    def __init__(self, model, config, seed=0, input_mean=0.0, input_std=1.0, total_tasks=5, decay=0.5):
        super().__init__(model, config, seed, input_mean, input_std, total_tasks=total_tasks)
        self.decay = float(decay)
        self.class_counts = np.zeros(model.n_classes, dtype=np.int64)

    def scale(self):
        return np.float32(self.decay ** self.tasks_learned)

    def weight_grad(self, l, connections, delta, inputs):
        return super().weight_grad(l, connections, delta, inputs) * self.scale()

    def bias_grad(self, l, delta):
        return super().bias_grad(l, delta) * self.scale()

    def end_task(self, state):
        super().end_task(state)
        self.class_counts += np.bincount(state.labels, minlength=self.model.n_classes)

    def extra_state(self):
        return {"class_counts": self.class_counts.copy()}

    def load_extra_state(self, state):
        counts = np.asarray(state.get("class_counts"))
        if set(state) != {"class_counts"} or counts.shape != (self.model.n_classes,):
            raise ValueError(f"decay_finetune state needs class_counts of shape ({self.model.n_classes},)")
        self.class_counts = counts.astype(np.int64)
