"""Training losses: one small module per loss (perceptual.py = LPIPS, ...)."""
