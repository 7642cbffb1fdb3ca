"""Faults that tests inject into a training through `TrainHooks` (module-level functions, so
they reach spawned ranks): die at a step, die while saving, NaN gradients."""

from __future__ import annotations

import os
import signal


def kill_at(step_to_kill: int, step: int) -> None:
    """SIGKILL this process when `step` is `step_to_kill`."""
    if step == step_to_kill:
        os.kill(os.getpid(), signal.SIGKILL)


def nan_at(steps: tuple[int, ...], step: int) -> bool:
    """Poison the gradients of the given steps."""
    return step in steps


def hooks_from_spec(spec: dict):
    """TrainHooks from a test's JSON spec: kill_after_step, kill_during_save, nan_steps."""
    from functools import partial

    from minitron_nemo.distill.trainer import TrainHooks

    return TrainHooks(
        after_step=partial(kill_at, spec["kill_after_step"]) if "kill_after_step" in spec else None,
        during_save=partial(kill_at, spec["kill_during_save"])
        if "kill_during_save" in spec
        else None,
        poison_grads=partial(nan_at, tuple(spec["nan_steps"])) if "nan_steps" in spec else None,
    )
