"""Sparse generalised linear models for SLDD and Q-SENN (specs/qsenn_sldd.md §3–§7).

problem    the elastic-net / group-lasso multinomial problem: λ_max, λ grids, proximal operators
shards     per-rank feature files written by the features stage, read back sharded or gathered
fast       distributed full-batch FISTA over the ranks' shards (solver=fast)
saga       glm-saga through its published API, on rank 0 over the gathered features (solver=glm_saga)
path       the λ-path walks both solvers share: feature selection and the sparse fit
rules      SLDD point choice and pruning, Q-SENN quantisation and bias rule (pure functions)
"""
