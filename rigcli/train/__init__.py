"""Training: the data (photos with rendered buffers), the loop, and the paper's two stages."""
