from baselines import kivi, mikv, uniform  # noqa: F401  (each module registers its methods)
