"""Samplers, one file per paper; each is a plain function over a denoiser."""
