"""RULER (NVIDIA/RULER, Apache-2.0) as a harness task: ``ruler:niah_single_1,vt,lengths=4096/8192``.

``generate`` holds RULER's templates, task configurations and generators (ported from its scripts),
``metrics`` its scorers, ``task`` the registered ``ruler`` task.
"""

from tasks.ruler.task import RULER, RULERConfig, expand_tasks

__all__ = ["RULER", "RULERConfig", "expand_tasks"]
