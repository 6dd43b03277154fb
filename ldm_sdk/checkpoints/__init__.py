"""Checkpoints: safe loading, original YAML configs, family detection, diffusers folders."""
