"""LongBench v1 as a harness task: ``longbench:trec,samsum`` (datasets and/or groups all, e, kivi8).

``prompts`` holds the protocol's data (templates, generation lengths, groups, metric per dataset),
``metrics`` the official metrics, ``task`` the registered ``longbench`` task.
"""

from tasks.longbench.task import LongBench, LongBenchConfig, expand_datasets  # registers "longbench"

__all__ = ["LongBench", "LongBenchConfig", "expand_datasets"]
