"""The offline demo: generated datasets of the hotdog.zip layout and a workspace of its own."""
