"""MLflow's limits, used by both the driver's side (gentrain.tracking) and RunLogger."""

# From mlflow.utils.validation (3.x): longer values are rejected, not cut.
_PARAM_VALUE_LIMIT = 6000
_TAG_VALUE_LIMIT = 8000
_KEY_LIMIT = 250
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
