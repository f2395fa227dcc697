"""Networks: one factory keyed by architecture name, and the trained classifier with its own
preprocessing that evaluation, the promotion gate, predict and serving all score through."""
