"""The studio: ``rig edit``'s controls behind a local web page (``service``: what the page does, no web
library; ``page``: the Gradio page over it)."""

from rigcli.studio.service import (
    LIGHT_MODES,
    PREVIEW_SIZE,
    PhotoSession,
    Settings,
    Studio,
    StudioEdit,
    engine_choices,
)

__all__ = ["LIGHT_MODES", "PREVIEW_SIZE", "PhotoSession", "Settings", "Studio", "StudioEdit", "engine_choices"]
