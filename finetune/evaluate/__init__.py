"""Evaluation: metrics and McNemar (numpy/scipy only, so Prefect tasks can import them), scoring
models on the test split, the Markdown report and the figures."""
