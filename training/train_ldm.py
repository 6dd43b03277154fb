"""Train a latent diffusion model: a thin entry point for torchrun and plain Python.

    python training/train_ldm.py --config ldm.yaml
    torchrun --standalone --nproc_per_node=2 training/train_ldm.py --config ldm.yaml

The script itself, which reads top to bottom, is :mod:`ldm_sdk.training.train_ldm`.
"""

from ldm_sdk.training.train_ldm import main

if __name__ == "__main__":
    main()
