"""Hyperparameter sweeps: `gentrain sweep` (Ray Tune trials of gentrain runs, MLflow parent/child runs)."""
