"""Training both LDM stages: data sets, losses, EMA, checkpointing and the training scripts."""
