"""The task registry: `model.json` names a model's task, and the job runs it through the task's
interface (`tasks.base.Task`). A new task (generation) is one more entry."""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.tasks.base import Task
from pipeline.tasks.scoring import BiScoring, CrossScoring

TASKS: dict[str, Task] = {t.name: t for t in (CrossScoring(), BiScoring())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; this version runs {', '.join(sorted(TASKS))}") from None
