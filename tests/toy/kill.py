"""A callback that kills its own process with SIGKILL at a given step, to test crash-safe resume."""

import os
import signal

from lightning.pytorch import Callback


class KillAtStep(Callback):
    """Send SIGKILL to this process right after training step `step` (global step count) completes."""

    def __init__(self, step: int = 5):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
