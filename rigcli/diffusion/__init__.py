"""The diffusion model: the schedule and DDIM samplers, the conditioned UNet with its presets, saved models."""
