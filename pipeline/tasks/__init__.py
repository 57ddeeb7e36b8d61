"""The task registry: `model.json` names a model's task, and the job runs it through the task's
interface (`tasks.base.Task`): `cross` and `bi` scoring, `generate`."""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.tasks import base
from pipeline.tasks.base import Task
from pipeline.tasks.generation import Generation
from pipeline.tasks.scoring import BiScoring, CrossScoring

TASKS: dict[str, Task] = {t.name: t for t in (CrossScoring(), BiScoring(), Generation())}


def check_input(task: Task, reader) -> None:
    """Refuse input the task does not take (see tasks.base.check_input)."""
    base.check_input(task, reader, TASKS)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; this version runs {', '.join(sorted(TASKS))}") from None
