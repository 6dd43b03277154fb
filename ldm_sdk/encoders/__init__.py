"""Condition encoders (text, class, semantic map, low-res image, mask, layout), each a plugin."""
