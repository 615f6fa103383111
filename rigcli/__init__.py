"""rig: learn a person's face from ~20 photos, then edit new photos of them (DiffusionRig)."""

__version__ = "0.1.0"


class RigError(Exception):
    """A problem with the user's input or environment: shown as one line, exit code 2."""

    exit_code = 2
