"""Tasks: what differs between classification, segmentation, detection and the tasks to come.

A task owns its network's new parts, its loss, its metrics, its batch format, its data and
its test report (``Task``); everything else (weight sources, freezing strategies,
optimizers, the run story, sweeps, tracking) is shared and never asks which task runs.
A new task is a new module here, registered with ``@register_task``, plus
``conf/task/<name>.yaml``.
"""

from transferlab.tasks.base import TASKS, Step, Task, build_task, register_task

__all__ = ["TASKS", "Step", "Task", "build_task", "register_task"]
