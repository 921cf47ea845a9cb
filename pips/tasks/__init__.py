"""Tasks: what `pips train` learns codes of, one file each, in the :data:`TASKS` registry.

A task owns its data, model, losses and training step, metrics and headline metric, the unit it
counts, its reconstruction drawings, ``encode`` / ``decode`` between items and codes, and its probe
targets (:class:`~pips.tasks.base.Task`). The runner, the verbs, the callbacks and the report read
these and never ask which task they hold. A new task is one file and one :func:`register_task`.
"""

from pips.tasks.base import (
    TASKS,
    Headline,
    Items,
    PeriodicDrawing,
    ProbeData,
    Task,
    TaskError,
    get_task,
    register_task,
)
from pips.tasks.grids import GridsTask
from pips.tasks.images import ImagesTask
from pips.tasks.modular import ModularTask
from pips.tasks.prior import PriorTask
from pips.tasks.sequences import SequencesTask
from pips.tasks.text import TextTask

__all__ = [
    "TASKS",
    "GridsTask",
    "Headline",
    "ImagesTask",
    "Items",
    "ModularTask",
    "PeriodicDrawing",
    "PriorTask",
    "ProbeData",
    "SequencesTask",
    "Task",
    "TaskError",
    "TextTask",
    "get_task",
    "register_task",
]
