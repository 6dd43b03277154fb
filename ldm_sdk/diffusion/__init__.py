"""Schedules, parameterizations, denoiser wrappers (guidance, masks) and the training objective."""
