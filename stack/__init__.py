"""The shared stack on one machine (`make stack` / `make stack-down`): PostgreSQL, an S3 object
store (s3rver, objects as files), `mlflow server` (basic-auth), `prefect server` (an API auth
string) and a Prefect process worker, on 127.0.0.1 with all their state and generated secrets
under ``.stack/``. `make stack-backup` / `make stack-restore` archive and restore it. See
docs/team.md for the topology and what each client needs.

Not part of the pipeline: no stage imports it. The services are real programs started as
detached processes; this package only starts, checks and stops them.
"""
