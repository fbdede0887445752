from baselines import alignedkv, kivi, kvmix, kvquant, mikv, qoq, uniform, xquant  # noqa: F401  (each module registers its methods)
