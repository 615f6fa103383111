"""rig eval: held-out photos, a fixed suite of edits, metrics and the report."""
