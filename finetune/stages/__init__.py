"""The DVC stages, one module each, named like the stage: ``python -m finetune.stages.<name>``.

Each is a thin command over a plain function (config and paths in, results out); dvc.yaml runs
them, and `python -m finetune <name>` is the same command.
"""
