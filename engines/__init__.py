"""Inference runtimes for the conditioned UNet step (torch, ONNX Runtime, TensorRT).

Each engine serves ``eps = denoise(x_t, t, buffers, latent)`` for a batch; the sampler stays in
torch and calls whichever engine is chosen. The runtimes arrive with the export work.
"""
