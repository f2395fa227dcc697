"""Getting data in: download, archive, fetch, the file index, the Great Expectations checks and
their Data Docs (the fetch and validate stages; training never imports these)."""
