"""Model files of known architectures with random weights, for timing the tasks without a download.

A task's time depends on the architecture, the size and the steps, not on the weights' values. So until the
built-in default models exist (a later issue), ``ldm-sdk bench-tasks --random-model NAME`` times the tasks on
one of these, written once into a folder and loaded like any checkpoint:

* ``sd15``: Stable Diffusion 1.x exactly (the ``sd1`` family's config: the 859.5 M-parameter UNet, the KL-f8
  autoencoder and CLIP ViT-L/14's text tower, 123 M parameters, tokenized with the real CLIP BPE), 512 px;
* ``sd15-ci``: the same shrunk to the size CI can afford, as the sampling benchmark's ``--size ci``
  (:func:`ldm_sdk.benchmarks.common.ci`: UNet width 64 with 2 heads, first stage width 32) with the full
  text tower, at 256 px (its config's latent size 32, so 256 px is also the tasks' default size);
* ``sd15-inpaint`` / ``sd15-inpaint-ci``: the ``sd1-inpaint`` family (Stable Diffusion 1.5 inpainting: the
  masked image's latent and the mask concatenated to the latent, 9 input channels, the prompt through
  cross-attention) at those two sizes.

Weights are :func:`~ldm_sdk.benchmarks.common.randomize_`'s variance-preserving values (seeded), so
activations stay in range through every layer; the images are noise-like, which does not change a timing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_sdk.benchmarks import common as C

#: name -> (description, image size in pixels)
RANDOM_MODELS: dict[str, tuple[str, int]] = {
    "sd15": (
        "Stable Diffusion 1.x architecture (UNet 859.5 M, KL-f8, CLIP ViT-L/14 text), random weights",
        512,
    ),
    "sd15-ci": ("SD 1.x shrunk to the CI size (UNet width 64, 2 heads; KL-f8 width 32), full CLIP text", 256),
    "sd15-inpaint": (
        "Stable Diffusion 1.5 inpainting architecture (9 input channels: latent, mask, masked image; "
        "the sd15 sizes), random weights",
        512,
    ),
    "sd15-inpaint-ci": ("SD 1.5 inpainting shrunk to the CI size, as sd15-ci", 256),
}


def random_model_file(
    name: str, folder: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float16
) -> Path:
    """Write (once: an existing file is reused) the random-weight model ``name`` of :data:`RANDOM_MODELS`
    into ``folder`` as ``random-NAME-seedSEED-DTYPE.safetensors`` (weights stored in ``dtype``) and return its
    path. Unknown names raise ``ValueError`` listing the known ones."""
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; valid: {', '.join(RANDOM_MODELS)}")
    path = Path(folder) / f"random-{name}-seed{seed}-{str(dtype).removeprefix('torch.')}.safetensors"
    if path.is_file():
        return path
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.checkpoints.families import get_family
    from ldm_sdk.checkpoints.loader import save
    from ldm_sdk.encoders.text_clip import FrozenCLIPEmbedder

    config = get_family("sd1-inpaint" if "inpaint" in name else "sd1").config
    if name.endswith("-ci"):
        arch = C.ci(C.ARCHS["sd15"])
        assert config.unet is not None and config.diffusion is not None and arch.vae_ch is not None
        first = config.first_stage
        config = config.model_copy(
            update={
                "diffusion": config.diffusion.model_copy(update={"image_size": arch.image_px // 8}),
                "unet": config.unet.model_copy(
                    update={k: arch.unet[k] for k in ("model_channels", "num_heads")}
                ),
                "first_stage": first.model_copy(
                    update={"ddconfig": first.ddconfig.model_copy(update={"ch": arch.vae_ch})}  # type: ignore[union-attr]
                ),
            }
        )
    bundle = ModelBundle(config)  # built normally: its buffers (the schedule) must be real
    gen = torch.Generator().manual_seed(seed)
    C.randomize_(bundle, gen)
    text = FrozenCLIPEmbedder()  # the ViT-L/14 text architecture, random
    C.randomize_(text, gen)
    bundle.cond_stage_weights = {k: v.detach().clone() for k, v in text.state_dict().items()}
    bundle.to(dtype)
    bundle.cond_stage_weights = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in bundle.cond_stage_weights.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(bundle, path, metadata={"ldm_sdk.random_model": name, "ldm_sdk.random_seed": str(seed)})


__all__ = ["RANDOM_MODELS", "random_model_file"]
