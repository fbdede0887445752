from baselines import uniform  # noqa: F401  (registers fp16, int, int8, int4, int2)
