"""From fitted parameters to pixels: the rasterizer and DiffusionRig's physical buffers."""
