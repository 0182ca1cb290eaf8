"""The backtracking guard model: training, the batched incremental scorer, evaluation and benchmarks.

Nothing heavy is imported here: `guard.cli` must stay cheap to import for `backtrack serve`.
"""
