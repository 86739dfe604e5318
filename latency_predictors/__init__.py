"""Shipped latency predictors: one folder per device profile, with the data they were fitted on."""
