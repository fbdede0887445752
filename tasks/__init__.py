"""Benchmarks: WikiText-2 perplexity, LongBench, lm-eval; ``harness.builtins`` names them (imported lazily)."""
