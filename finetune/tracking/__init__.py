"""MLflow at the edge: every `import mlflow` of the project lives in this package (the store,
the training run as a callback, the registry and promotion, the served model)."""
