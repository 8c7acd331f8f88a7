"""genlab evaluation: the importance-weighted estimator, metrics, reports, command line."""

from inference.importance import Estimate, estimate_log_marginal, log_weights

__all__ = ["Estimate", "estimate_log_marginal", "log_weights"]
