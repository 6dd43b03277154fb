"""The plugin through the runtime, as users get it: registered names, lazy import, entry point."""

from __future__ import annotations

import subprocess
import sys

import ldm_sdk_plugin_example.plugin as plugin
import pytest
import torch
from ldm_sdk_plugin_example.palette import PaletteEncoder

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.encoders.base import EncoderSpec
from ldm_sdk.runtime import Runtime
from ldm_sdk.samplers.base import linspace_timesteps


def test_registers_a_sampler_and_an_encoder(ldm_runtime: Runtime) -> None:
    name = ldm_runtime.register_plugin(plugin, name="example")
    info = next(p for p in ldm_runtime.plugins() if p.name == name)
    assert info.registered == {"samplers": ("heun",), "condition_encoders": ("palette",)}
    entry = ldm_runtime.registries.samplers.entry("heun")
    assert entry.description.startswith("Heun's 2nd-order ODE sampler")
    spec = ldm_runtime.registries.condition_encoders.get("palette")
    assert isinstance(spec, EncoderSpec) and spec.factory is PaletteEncoder
    assert (spec.modality, spec.kind, spec.trainable) == ("color", "crossattn", True)


def test_the_palette_conditions_a_tiny_sd_model(ldm_runtime: Runtime, tiny_sd_bundle: ModelBundle) -> None:
    ldm_runtime.register_plugin(plugin, name="example")
    spec = ldm_runtime.registries.condition_encoders.get("palette")
    width = tiny_sd_bundle.config.unet.context_dim  # type: ignore[union-attr]
    encoder = spec.factory(context_dim=width, n_colors=3).eval()
    reference = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        cond = encoder.conditioning(encoder(reference))
        uncond = encoder.conditioning(encoder.unconditional(1))
        den = tiny_sd_bundle.denoiser(cond, guidance_scale=3.0, uncond=uncond)
        sample = ldm_runtime.registries.samplers.get("heun")
        z = sample(den, torch.randn(1, 4, 8, 8), linspace_timesteps(3))
    assert z.shape == (1, 4, 8, 8) and torch.isfinite(z).all()


def test_importing_the_plugin_module_imports_no_torch() -> None:
    code = "import sys, ldm_sdk_plugin_example.plugin\nassert 'torch' not in sys.modules, 'torch imported'\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_discovered_by_entry_point_when_installed(ldm_runtime_with_entrypoints: Runtime) -> None:
    names = {p.name: p for p in ldm_runtime_with_entrypoints.plugins()}
    if "example" not in names:
        pytest.skip("ldm-sdk-plugin-example is not installed (tests run from a source checkout)")
    assert names["example"].source == "entrypoint" and names["example"].version == "0.1.0"
    assert "heun" in ldm_runtime_with_entrypoints.registries.samplers
