"""Fine-tuning with L2 weight decay: a complete plugin method for spacenet_np.

A method is a ``Learner`` subclass. This one reuses FineTune's static sparse network and task life cycle and
adds ``weight_decay * w`` to the gradient of every connection and bias (the gradient of
``weight_decay / 2 * ||w||^2``). Its constructor option is declared once in ``OPTIONS``; from that declaration
the train CLI gets ``--weight-decay``, the sweep can search ``weight_decay``, run specs check it, and checkpoints
save it (``extra_options`` returns the attributes named like the options). A method with training state beyond
the network would also return it from ``extra_state()`` and take it back in ``load_extra_state(state)``.
"""
import numpy as np

from spacenet_np.methods import TOTAL_TASKS, FineTune
from spacenet_np.options import Option


class L2FineTune(FineTune):
    """FineTune (the static sparse network, every connection trains on every task) with L2 weight decay."""

    name = "l2_finetune"  # the entry point's name: checkpoints record it
    OPTIONS = (TOTAL_TASKS, Option("weight_decay", float, 1e-4, "L2 penalty on every weight and bias", low=0.0))

    def __init__(self, model, config, seed=0, input_mean=0.0, input_std=1.0, total_tasks=5, weight_decay=1e-4):
        super().__init__(model, config, seed, input_mean, input_std, total_tasks=total_tasks)
        if not (np.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay={weight_decay!r} must be a finite number >= 0")
        self.weight_decay = float(weight_decay)

    def weight_grad(self, l, connections, delta, inputs):
        """dL/dW of layer ``l`` at ``connections`` plus the decay term. (m,) float32, or (m, 9) for a convolution."""
        grad = super().weight_grad(l, connections, delta, inputs)
        return grad + np.float32(self.weight_decay) * self.model.layers[l].weights[connections]

    def bias_grad(self, l, delta):
        """dL/db of layer ``l`` plus the decay term. (out slots,) float32."""
        return super().bias_grad(l, delta) + np.float32(self.weight_decay) * self.model.layers[l].bias
