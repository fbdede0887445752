from baselines import alignedkv, kivi, kvquant, mikv, qoq, uniform  # noqa: F401  (each module registers its methods)
