"""The built-in methods and tasks, by dotted path: the only place in ``harness/`` that names them.

Nothing here is imported until a spec names it (``harness.registry``). A user's own package adds
entries through entry points instead (see README "Adding a method"); each class serves its ``name``
and the names of its ``variants``, so every variant is listed here against its class.

Elsewhere in ``harness/`` methods appear only as data and prose: the shipped reproduce profiles
(``profiles/*.toml``) list the methods they run, and docstrings cite methods as examples. No code
there imports a method, compares against a method's name or reads a method's options.
"""

from __future__ import annotations

BUILTIN_METHODS: dict[str, str] = {
    "full": "baselines.uniform:FullPrecision",
    "fp16": "baselines.uniform:FP16",
    "int": "baselines.uniform:Uniform",
    "int8": "baselines.uniform:Uniform",
    "int4": "baselines.uniform:Uniform",
    "int2": "baselines.uniform:Uniform",
    "int-k4v2": "baselines.uniform:Uniform",
    "kivi": "baselines.kivi:KIVI",
    "kivi-2": "baselines.kivi:KIVI",
    "kivi-4": "baselines.kivi:KIVI",
    "kivi-k4v2": "baselines.kivi:KIVI",
    "kvquant": "baselines.kvquant:KVQuant",
    "kvquant-4b": "baselines.kvquant:KVQuant",
    "kvquant-4b-1%": "baselines.kvquant:KVQuant",
    "kvquant-3b-1%": "baselines.kvquant:KVQuant",
    "kvquant-2b-1%": "baselines.kvquant:KVQuant",
    "qoq": "baselines.qoq:QoQ",
    "mikv": "baselines.mikv:MiKV",
    "kvmix": "baselines.kvmix:KVmix",
    "xquant": "baselines.xquant:XQuant",
    "alignedkv": "baselines.alignedkv:AlignedKV",
    "kvtuner": "baselines.kvtuner:KVTuner",
    "kvtuner-4": "baselines.kvtuner:KVTuner",
    "kvtuner-3": "baselines.kvtuner:KVTuner",
    "qjl": "baselines.qjl:QJL",
    "polarquant": "baselines.polarquant:PolarQuant",
    "polarquant-33": "baselines.polarquant:PolarQuant",
    "polarquant-v4": "baselines.polarquant:PolarQuant",
    "dynamic": "baselines.hf_caches:Dynamic",
    "hf-quanto": "baselines.hf_caches:HFQuanto",
    "hf-hqq": "baselines.hf_caches:HFHQQ",
    "moqae": "moqae.method:MoQAE",
    "moqae-oracle": "moqae.oracle:MoQAEOracle",
}

BUILTIN_TASKS: dict[str, str] = {
    "wikitext2": "tasks.wikitext2:WikiText2",
    "longbench": "tasks.longbench.task:LongBench",
    "niah": "tasks.niah:NIAH",
    "lmeval": "tasks.lmeval:LMEval",
    "ruler": "tasks.ruler.task:RULER",
}

METHOD_GROUP = "moqae_harness.methods"
TASK_GROUP = "moqae_harness.tasks"

#: the method every ratio is taken against (profiling, reports), and the task ``run`` defaults to
REFERENCE_METHOD = "fp16"
#: ``python -m harness profile``'s default references: fp16, then transformers' own DynamicCache
PROFILE_REFERENCES = (REFERENCE_METHOD, "dynamic")
DEFAULT_TASK = "wikitext2"
