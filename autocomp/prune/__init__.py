"""Compress an existing model: dependency-aware channel pruning (Torch-Pruning's dependency
graph), per-layer int8/fp32 bits, and the policy space the search explores over both."""
