"""Ray Train/Tune orchestration, MLflow tracking and the ``sprout`` command."""
