"""Prefect flows: `pipeline` (the whole chain, the main job) and `retrain` (scheduled), and what
they need: the workspace lock, notifications, DVC queries and a local Prefect server."""

import os

# Prefect gives its local ephemeral server 20 s to start; on a busy 2-core machine (CI) the
# first start (database migrations) takes longer. A value the user set still wins.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# The local server would otherwise try to send usage telemetry, an error line on every
# air-gapped run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
