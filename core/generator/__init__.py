"""Latent generator for gFID/IS: flow matching, latent encoding, DiT training."""
