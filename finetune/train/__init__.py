"""Training: runtime, strategy (freezing, rates, unfreezing), the epoch loop, cached features,
checkpoints, loaders and DistributedDataParallel. No MLflow here: tracking reaches ``fit`` as a
callback object (finetune/train/callbacks.py)."""
