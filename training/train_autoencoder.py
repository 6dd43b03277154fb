"""Train a first-stage autoencoder: a thin entry point for torchrun and plain Python.

    python training/train_autoencoder.py --config ae.yaml
    torchrun --standalone --nproc_per_node=2 training/train_autoencoder.py --config ae.yaml

The script itself, which reads top to bottom, is :mod:`ldm_sdk.training.train_autoencoder`.
"""

from ldm_sdk.training.train_autoencoder import main

if __name__ == "__main__":
    main()
