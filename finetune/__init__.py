"""Fine-tuning pipeline library: pure functions that the CLI (and so DVC and Prefect) calls."""
