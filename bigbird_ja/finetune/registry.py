"""The fine-tuning task registry: task name -> `tasks.Task`, the one list of tasks.

`FinetuneConfig.task`, `tasks.get_task` and the task choices of `bigbird-ja finetune` / `evaluate` read it; `tasks`
fills it (importing the finetune package imports `tasks` through `run`, so it is full before any config is loaded).
It sits below both `config`, which checks a task name against it, and `tasks`, which reads the config's sections,
so that neither of them imports the other's importer.
"""

from __future__ import annotations

from typing import Any

TASKS: dict[str, Any] = {}  # name -> `tasks.Task`, in the order the tasks are listed (the CLI's choices)

__all__ = ["TASKS"]
