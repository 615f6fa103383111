"""Editing: controls to edited parameters, the editor pipeline, and a person's exported engines."""
