"""The CPU fast path: feature detection, what configure_cpu_inference changes, that a bf16 UNet (and a
whole guided DDIM run) stays within bf16 tolerance of fp32, and that the exact parts of the path (K/V cache,
prepacked weights) change nothing: the configured model equals a plain bf16 channels_last copy bit for bit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import ldm_sdk.accel.cpu as cpu_module
from ldm_sdk.accel import CpuFeatures, configure_cpu_inference, cpu_features
from ldm_sdk.accel.cpu_prepack import PackedConv2d, PackedLinear, prepack_available
from ldm_sdk.accel.kv_cache import ContextCachedLinear, context_cache_of
from ldm_sdk.testing.tiny import ALL, random_bundle
from tests.accel.capture_checks import random_inputs, rel_err, run_ddim_cfg
from tests.accel.capture_checks import tiny_bundle as plain_bundle

CPU = torch.device("cpu")
X86_INFO = "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n"
BF16 = cpu_features(X86_INFO.format(extra="avx512_bf16"), 4, machine="x86_64", capability="AVX512")
NO_BF16 = cpu_features(X86_INFO.format(extra=""), 4, machine="x86_64", capability="AVX512")


@pytest.fixture(autouse=True)
def _keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("extra", "machine", "capability", "native"),
    [
        ("avx512_bf16", "x86_64", "AVX512", True),
        ("amx_bf16 amx_tile", "x86_64", "AVX512", True),
        ("avx512_bf16", "x86_64", "AVX2", False),  # torch limited to AVX2 (ATEN_CPU_CAPABILITY)
        ("", "x86_64", "AVX512", False),
        ("bf16 asimd", "aarch64", "DEFAULT", True),
    ],
)
def test_feature_detection(extra: str, machine: str, capability: str, native: bool) -> None:
    info = X86_INFO.format(extra=extra).replace("flags\t\t", "Features" if machine == "aarch64" else "flags")
    feats = cpu_features(info, 3, machine=machine, capability=capability)
    assert feats.native_bf16 is native
    assert feats.model_name == "Test CPU 9000" and feats.usable_cores == 3
    assert ("bf16 hardware: none" in feats.describe()) == (extra == "")


def test_probe_of_this_machine() -> None:
    feats = cpu_features()
    assert feats.usable_cores >= 1 and feats.capability and isinstance(feats, CpuFeatures)


def tiny_unet() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    bundle = random_bundle(ALL["sd1"])
    unet = bundle.unet.eval()
    x, t, cond = random_inputs(bundle, 2, 16, CPU, torch.float32, seed=2)
    assert cond.crossattn is not None
    return unet, {"x": x, "timesteps": t, "context": cond.crossattn}


def test_configure_bf16_where_native() -> None:
    unet, call = tiny_unet()
    with torch.no_grad():
        ref = unet(**call)
    done = configure_cpu_inference(unet, features=BF16)
    assert done.dtype == torch.bfloat16 and done.reason == "native bf16 on this CPU"
    assert done.threads == torch.get_num_threads() == 4
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    convs = [m for m in unet.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    with done.inference():
        out = unet(**call)
    assert out.dtype == torch.float32  # the UNet returns its input's dtype: samplers keep float32
    err = rel_err(out, ref)
    assert err < 3e-2, f"bf16 UNet vs fp32: rel. err {err:.3e}"
    assert "bf16 (native bf16 on this CPU)" in done.describe()


def test_configure_fp32_without_bf16_hardware() -> None:
    unet, call = tiny_unet()
    with torch.no_grad():
        ref = unet(**call)
    done = configure_cpu_inference(unet, features=NO_BF16, threads=0)
    assert done.dtype == torch.float32 and done.reason == "no native bf16 on this CPU"
    with done.inference():
        out = unet(**call)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # channels_last only reorders the math


def test_guided_ddim_in_bf16_stays_close_to_fp32() -> None:
    bundle = random_bundle(ALL["sd1"])
    bundle.model.eval()
    ref, _ = run_ddim_cfg(bundle, CPU, torch.float32, None, steps=10)
    configure_cpu_inference(bundle.unet, bundle.first_stage_model, features=BF16, threads=0)
    out, _ = run_ddim_cfg(bundle, CPU, torch.bfloat16, None, steps=10)
    err = rel_err(out, ref)
    assert out.dtype == torch.float32 and err < 5e-2, f"bf16 DDIM+CFG vs fp32: rel. err {err:.3e}"


def test_explicit_dtypes() -> None:
    unet, _ = tiny_unet()
    done = configure_cpu_inference(unet, dtype="bf16", features=NO_BF16, threads=0, channels_last=False)
    assert done.dtype == torch.bfloat16 and "emulates bf16" in done.reason and not done.channels_last
    done = configure_cpu_inference(unet, dtype=torch.float32, features=BF16, threads=0)
    assert done.dtype == torch.float32 and done.reason == "requested"


def test_refusals() -> None:
    unet, _ = tiny_unet()
    with pytest.raises(ValueError, match="at least one module"):
        configure_cpu_inference()
    with pytest.raises(TypeError, match=r"expected torch\.nn\.Module instances, got int"):
        configure_cpu_inference(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp16 is not supported on CPU; valid: fp32, bf16"):
        configure_cpu_inference(unet, dtype="fp16")
    with pytest.raises(ValueError, match="unknown dtype"):
        configure_cpu_inference(unet, dtype="int8")
    with pytest.raises(ValueError, match="threads must be None"):
        configure_cpu_inference(unet, threads=-1)
    with pytest.raises(ValueError, match=r"holds a DiffusionSchedule.*bundle\.unet"):
        configure_cpu_inference(random_bundle(ALL["sd1"]))
    with pytest.raises(ValueError, match="has tensors on meta"):
        configure_cpu_inference(nn.Linear(2, 2, device="meta"))


def test_refuses_prepack_without_the_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    unet, _ = tiny_unet()
    monkeypatch.setattr(cpu_module, "prepack_available", lambda: False)
    with pytest.raises(ValueError, match="lacks the oneDNN / MKL prepacked ops"):
        configure_cpu_inference(unet, features=BF16, threads=0, prepack=True)
    done = configure_cpu_inference(unet, features=BF16, threads=0)  # auto: silently without
    assert done.prepacked is None and not any(isinstance(m, PackedConv2d) for m in unet.modules())


@pytest.mark.skipif(not prepack_available(), reason="torch build without mkldnn / MKL")
def test_exact_parts_change_nothing_in_bf16() -> None:
    """K/V cache + prepacked weights on top of bf16 / channels_last: the UNet's outputs over several calls and
    a whole guided DDIM run (UNet and first stage) equal a plain bf16 channels_last copy bit for bit."""
    plain = plain_bundle("sd1", CPU, torch.bfloat16)
    for m in (plain.unet, plain.first_stage_model):
        m.to(memory_format=torch.channels_last)
    fast = random_bundle(ALL["sd1"])
    done = configure_cpu_inference(fast.unet, fast.first_stage_model, features=BF16, threads=0)
    assert done.dtype == torch.bfloat16 and done.prepacked is not None
    n_attn2 = sum(1 for name, _ in fast.unet.named_modules() if name.endswith("attn2"))
    assert done.kv_cache_layers == n_attn2 > 0 and context_cache_of(fast.unet) is not None
    assert context_cache_of(fast.first_stage_model) is None  # no cross-attention there
    assert any(isinstance(m, ContextCachedLinear) for m in fast.unet.modules())
    assert any(isinstance(m, PackedConv2d) for m in fast.first_stage_model.modules())
    assert done.prepacked.convs > 0 and done.prepacked.linears > 0
    assert "K/V cache on" in done.describe() and "prepacked weights" in done.describe()
    assert list(fast.unet.state_dict()) == list(plain.unet.state_dict())
    x, t, cond = random_inputs(plain, 2, 16, CPU, torch.bfloat16, seed=9)
    with done.inference():
        for i in range(3):
            ref = plain.unet(x * (1 + i), t, context=cond.crossattn)
            assert torch.equal(fast.unet(x * (1 + i), t, context=cond.crossattn.clone()), ref)
    ref_lat, _ = run_ddim_cfg(plain, CPU, torch.bfloat16, None, steps=10)
    lat, _ = run_ddim_cfg(fast, CPU, torch.bfloat16, None, steps=10)
    assert torch.equal(lat, ref_lat)
    with done.inference():
        z = lat.to(done.dtype)  # a first stage is fed latents in its dtype
        assert torch.equal(fast.decode_first_stage(z), plain.decode_first_stage(z))


@pytest.mark.skipif(not prepack_available(), reason="torch build without mkldnn / MKL")
def test_fp32_fast_path_within_fp32_rounding() -> None:
    unet, call = tiny_unet()
    with torch.no_grad():
        ref = unet(**call)
    done = configure_cpu_inference(unet, features=NO_BF16, threads=0)
    assert done.dtype == torch.float32 and done.prepacked is not None and done.kv_cache_layers > 0
    with done.inference():
        for _ in range(2):
            assert rel_err(unet(**call), ref) < 1e-5


def test_exact_parts_can_be_switched_off() -> None:
    unet, _ = tiny_unet()
    done = configure_cpu_inference(unet, features=BF16, threads=0, cache_kv=False, prepack=False)
    assert done.kv_cache_layers == 0 and done.prepacked is None
    assert not any(isinstance(m, ContextCachedLinear | PackedConv2d | PackedLinear) for m in unet.modules())
