"""The report wing: the paper's published numbers, the tables beside ours, MLflow tracking.
Imports only the base modules (and MLflow)."""
