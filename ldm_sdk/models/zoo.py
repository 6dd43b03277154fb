"""The first-stage models of the CompVis LDM model zoo, as typed configs.

Values are those of ``models/first_stage_models/<name>/config.yaml`` in CompVis/latent-diffusion (also
shipped in CompVis/stable-diffusion; vq-f8's is ``model.yaml`` there): ``model.params.embed_dim``,
``n_embed`` and ``ddconfig``. All use ``ch=128``, ``num_res_blocks=2``, ``resolution=256``, ``dropout=0``,
``in_channels=out_ch=3`` and ``z_channels == embed_dim``; KL models have ``double_z: true``, VQ ones
``false``. The training ``lossconfig`` is not part of the network and is left out.

The Stable Diffusion 1.x/2.x VAE (``first_stage_config`` of ``v1-inference.yaml`` / ``v2-inference.yaml``)
is exactly ``kl-f8``: ``embed_dim=4``, ``z_channels=4``, ``ch_mult=[1, 2, 4, 4]``, no attention levels.
``SD_VAE`` names that same config.
"""

from __future__ import annotations

from ldm_sdk.models.configs import AutoencoderKLConfig, DDConfig, VQModelConfig


def _dd(z: int, ch_mult: tuple[int, ...], attn: tuple[int, ...], *, kl: bool, **extra: object) -> DDConfig:
    return DDConfig.model_validate(
        {
            "double_z": kl,
            "z_channels": z,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": ch_mult,
            "num_res_blocks": 2,
            "attn_resolutions": attn,
            "dropout": 0.0,
            **extra,
        }
    )


def _kl(embed_dim: int, ch_mult: tuple[int, ...], attn: tuple[int, ...]) -> AutoencoderKLConfig:
    return AutoencoderKLConfig(ddconfig=_dd(embed_dim, ch_mult, attn, kl=True), embed_dim=embed_dim)


def _vq(
    embed_dim: int, n_embed: int, ch_mult: tuple[int, ...], attn: tuple[int, ...], **extra: object
) -> VQModelConfig:
    return VQModelConfig(
        ddconfig=_dd(embed_dim, ch_mult, attn, kl=False, **extra), n_embed=n_embed, embed_dim=embed_dim
    )


FIRST_STAGE_ZOO: dict[str, AutoencoderKLConfig | VQModelConfig] = {
    "kl-f4": _kl(3, (1, 2, 4), ()),
    "kl-f8": _kl(4, (1, 2, 4, 4), ()),
    "kl-f16": _kl(16, (1, 1, 2, 2, 4), (16,)),
    "kl-f32": _kl(64, (1, 1, 2, 2, 4, 4), (16, 8)),
    "vq-f4": _vq(3, 8192, (1, 2, 4), ()),
    "vq-f4-noattn": _vq(3, 8192, (1, 2, 4), (), attn_type="none"),
    "vq-f8": _vq(4, 16384, (1, 2, 2, 4), (32,)),
    "vq-f8-n256": _vq(4, 256, (1, 2, 2, 4), (32,)),
    "vq-f16": _vq(8, 16384, (1, 1, 2, 2, 4), (16,)),
}
SD_VAE: AutoencoderKLConfig = FIRST_STAGE_ZOO["kl-f8"]  # type: ignore[assignment]  # it is the KL entry
