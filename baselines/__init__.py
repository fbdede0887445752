"""Baselines: each module holds one method class; ``harness.builtins`` names them (imported lazily)."""
