"""Prefect tasks: each runs one DVC stage (so dvc.lock stays the truth) or one registry action."""
