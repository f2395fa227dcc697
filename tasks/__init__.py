"""Prefect tasks only: each runs one DVC stage (so dvc.lock stays the truth) or one registry
action, or publishes the run's report."""
