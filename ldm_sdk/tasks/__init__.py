"""Editing tasks (txt2img, inpaint, upscale, ...)."""
