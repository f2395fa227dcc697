"""Data: download, verify and extract archives (fetch), index and validate image folders (GX
checks), images and transforms, the decode cache, and lineage (DVC data version, git commit)."""
