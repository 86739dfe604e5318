"""Budgeted joint search: Optuna controller, accuracy predictor, evolution, Ray backend."""

from autocomp.search.accuracy import AccuracyPredictor, candidate_features, kendall_tau
from autocomp.search.controller import EvolutionOptions, SearchResult, pareto_front, run_search
from autocomp.search.costs import CostModel

__all__ = [
    "AccuracyPredictor",
    "CostModel",
    "EvolutionOptions",
    "SearchResult",
    "candidate_features",
    "kendall_tau",
    "pareto_front",
    "run_search",
]
