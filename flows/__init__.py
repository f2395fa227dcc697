"""Prefect flows: `pipeline` (the whole chain, the main job); later `retrain` (scheduled)."""
