"""train_ldm on hybrid models (Stable Diffusion inpainting: 9-channel UNet input = latent + mask +
masked-image latent, text through cross-attention): it learns, the concat map it feeds the UNet is the one
the inpaint task feeds it for the same image and mask, the export inpaints, and condition dropout replaces
only the text. Also the LDM-inpainting layout (``concat``, 7 channels) and the refusals."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils.data import Dataset

import ldm_sdk
from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.loader import save
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.objective import diffusion_loss
from ldm_sdk.encoders.mask import MaskConditioner, MaskedImage
from ldm_sdk.models.configs import ModelConfig
from ldm_sdk.models.unet import UNetModel
from ldm_sdk.testing.tiny import TINY_KL_F8
from ldm_sdk.training.train_ldm import main
from tests.tasks.tiny_models import LDM_INPAINT, SD_INPAINT_TXT

SIZE = 64  # KL-f8: 8 x 8 latents, the tiny UNet's two levels


def _image(seed: int) -> np.ndarray:
    """A smooth uint8 ``SIZE x SIZE x 3`` image (bilinear 4x4 noise), what a user hands the inpaint task."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (up[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _region(i: int) -> np.ndarray:
    """A box of ``True`` (= repaint) that moves with ``i``."""
    region = np.zeros((SIZE, SIZE), dtype=bool)
    y, x = 8 + 4 * (i % 4), 12 + 3 * (i % 5)
    region[y : y + 24, x : x + 20] = True
    return region


class InpaintItems(Dataset[dict[str, Any]]):
    """Items as the data sets give them: ``image`` in [-1, 1] (uint8 / 127.5 - 1), ``mask`` ``[1, H, W]``
    (1 = repaint), ``caption``."""

    def __init__(self, n: int) -> None:
        self.images = [_image(i) for i in range(n)]
        self.regions = [_region(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 127.5 - 1.0
        mask = torch.from_numpy(self.regions[i].astype(np.float32))[None]
        return {"image": image, "mask": mask, "caption": f"a pattern number {i}", "class_label": i % 10}


@pytest.fixture(scope="module")
def kl_f8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    bundle = ModelBundle(ModelConfig(family="tiny-kl-f8", first_stage=TINY_KL_F8))
    return save(bundle, tmp_path_factory.mktemp("fs") / "kl_f8.safetensors")


@pytest.fixture(scope="module")
def sd_inpaint_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD-inpainting config of the task tests (hybrid, 4 + 1 + 4 channels, one-layer LDM BERT)."""
    path = tmp_path_factory.mktemp("model") / "sd_inpaint.json"
    path.write_text(SD_INPAINT_TXT.model_copy(update={"family": "tiny-sd-inpaint-trained"}).model_dump_json())
    return path


def _args(out: Path, model: Path, first_stage: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--first-stage", str(first_stage), "--image-size", str(SIZE),
        "--batch-size", "4", "--lr", "2e-3", "--no-scale-lr", "--log-every", "100", "--sample-every", "0",
        "--device", "cpu", "--out-dir", str(out), *extra,
    ]  # fmt: skip


@contextmanager
def unet_calls() -> Iterator[list[dict[str, Tensor]]]:
    """Record the input ``x`` and ``context`` of every UNetModel call made while the block runs."""
    calls: list[dict[str, Tensor]] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if isinstance(module, UNetModel):
            x = args[0] if args else kwargs["x"]
            context = kwargs["context"] if "context" in kwargs else args[2]
            calls.append({"x": x.detach().clone(), "context": context.detach().clone()})

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _fixed_loss(result: Any, data: InpaintItems) -> float:
    """The diffusion loss of the whole set with its full conditioning, at fixed timesteps and noise."""
    bundle, encoder, concat = result.bundle, result.encoder, result.concat_encoder
    items = [data[i] for i in range(len(data))]
    x = torch.stack([it["image"] for it in items])
    mask = torch.stack([it["mask"] for it in items])
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        z = bundle.encode_first_stage(x)
        t = torch.randint(0, bundle.schedule.num_timesteps, (len(items),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        cond = Conditioning(
            crossattn=encoder([it["caption"] for it in items]), concat=concat(MaskedImage(x, mask))
        )
        loss, _ = diffusion_loss(
            bundle.apply_model, bundle.schedule, z, cond, t, noise, bundle.config.diffusion
        )
    return float(loss)


def test_hybrid_model_learns(tmp_path: Path, sd_inpaint_model: Path, kl_f8: Path) -> None:
    data = InpaintItems(4)
    args = _args(tmp_path / "run", sd_inpaint_model, kl_f8)
    start = main([*args, "--max-steps", "0"], dataset=data)
    trained = main([*args, "--max-steps", "30", "--cond-drop", "0.1"], dataset=data)
    assert type(trained.concat_encoder).__name__ == "MaskConditioner"
    assert trained.concat_encoder.variant == "sd"  # type: ignore[union-attr]
    before, after = _fixed_loss(start, data), _fixed_loss(trained, data)
    assert after < 0.6 * before, (before, after)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory: pytest.TempPathFactory, sd_inpaint_model: Path, kl_f8: Path) -> Any:
    """One training step on ONE image and mask, every UNet input recorded."""
    data = InpaintItems(1)
    out = tmp_path_factory.mktemp("one")
    with unet_calls() as calls:
        result = main(
            [*_args(out, sd_inpaint_model, kl_f8, "--max-steps", "1", "--batch-size", "1")], dataset=data
        )
    return result, calls, data


def test_trainer_concat_equals_the_inpaint_tasks(one_step: Any) -> None:
    """Independent of the code paths: the UNet input channels 4..8 in training vs in the inpaint task."""
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.tasks import get_task
    from ldm_sdk.tasks.base import InpaintRequest, TaskInputs

    result, train_calls, data = one_step
    assert len(train_calls) == 1
    trained_concat = train_calls[0]["x"][:, 4:]
    assert trained_concat.shape == (1, 5, 8, 8)
    # mask channel: the region at latent resolution; masked-image channels: not all zero
    assert torch.equal(trained_concat[0, 0].bool(), torch.from_numpy(data.regions[0][::8, ::8]))
    assert trained_concat[:, 1:].abs().amax() > 0

    request = InpaintRequest(model=str(result.export), prompt="a pattern", steps=2, fit="pad", seed=0)
    inputs = TaskInputs(image=data.images[0], mask=data.regions[0].astype(np.float32))
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32") as runtime, unet_calls() as calls:
        out = get_task("inpaint")(request, runtime, inputs=inputs)
    assert out.manifest.extra["method"] == "model"
    assert calls
    # every call, both halves of guidance: the same concat map. The mask channel exactly; the latent channels
    # up to fp32 summation order (the task's image tensor is channels-last strided, so the first stage's
    # convolutions add in another order: ~1e-6)
    for call in calls:
        for row in call["x"][:, 4:]:
            assert torch.equal(row[0], trained_concat[0, 0])
            torch.testing.assert_close(row[None], trained_concat, rtol=1e-5, atol=1e-5)


def test_exported_hybrid_model_loads_and_inpaints(one_step: Any) -> None:
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.tasks import get_task
    from ldm_sdk.tasks.base import InpaintRequest, TaskInputs
    from ldm_sdk.tasks.context import supported_tasks

    result, _, data = one_step
    for path in (result.export, result.checkpoint):
        loaded = ldm_sdk.load(path)
        assert loaded.family == "tiny-sd-inpaint-trained" and loaded.conditioning_key == "hybrid"
        assert loaded.config.cond_stage.target == SD_INPAINT_TXT.cond_stage.target  # type: ignore[union-attr]
        assert loaded.config.unet.in_channels == 9  # type: ignore[union-attr]
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32") as runtime:
        assert supported_tasks(loaded, runtime.registries.condition_encoders) == ("inpaint", "outpaint")
        region = _region(3)
        request = InpaintRequest(model=str(result.export), prompt="a pattern", steps=3, fit="pad")
        out = get_task("inpaint")(
            request, runtime, inputs=TaskInputs(image=data.images[0], mask=region.astype(np.float32))
        )
    image = out.images[0]
    assert image.shape == (SIZE, SIZE, 3) and out.manifest.extra["method"] == "model"
    assert np.array_equal(image[~region], data.images[0][~region])
    assert not np.array_equal(image[region], data.images[0][region])


def test_condition_dropout_keeps_the_concat_part(tmp_path: Path, sd_inpaint_model: Path, kl_f8: Path) -> None:
    data = InpaintItems(4)
    runs = {}
    for drop in ("0", "1"):
        with unet_calls() as calls:
            result = main(
                [*_args(tmp_path / drop, sd_inpaint_model, kl_f8, "--max-steps", "1", "--cond-drop", drop)],
                dataset=data,
            )
        assert len(calls) == 1
        runs[drop] = (result, calls[0])
    kept, dropped = runs["0"][1], runs["1"][1]
    # same batch, same draws: the noisy latent and the concat map are identical, only the text differs
    assert torch.equal(kept["x"], dropped["x"])
    assert not torch.equal(kept["context"], dropped["context"])
    # the dropped run saw the null text on every row, with the concat map of its own images and masks
    context = dropped["context"]
    assert all(torch.equal(row, context[0]) for row in context)
    bundle = runs["1"][0].bundle
    conditioner = MaskConditioner.from_bundle(bundle)  # as the inpaint task builds it
    order = [int(i) for i in _batch_order(4, 4)]
    x = torch.stack([data[i]["image"] for i in order])
    mask = torch.stack([data[i]["mask"] for i in order])
    with torch.no_grad():
        torch.testing.assert_close(dropped["x"][:, 4:], conditioner(MaskedImage(x, mask)), rtol=0, atol=1e-6)


def _batch_order(size: int, batch: int, seed: int = 0) -> list[int]:
    from ldm_sdk.training.batches import ResumableSampler

    return ResumableSampler(size, seed=seed).order()[:batch]


def test_ldm_inpainting_concat_model_trains_and_inpaints(tmp_path: Path, vq_first_stage: Path) -> None:
    """The 7-channel LDM layout (conditioning_key concat, the first stage as cond stage) still trains."""
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.tasks import get_task
    from ldm_sdk.tasks.base import InpaintRequest, TaskInputs

    model = tmp_path / "ldm_inpaint.json"
    model.write_text(LDM_INPAINT.model_dump_json())
    result = main(
        [*_args(tmp_path / "run", model, vq_first_stage, "--max-steps", "2"), "--image-size", "32"],
        dataset=_Crop(InpaintItems(4), 32),
    )
    assert type(result.encoder).__name__ == "MaskConditioner" and result.concat_encoder is None
    assert result.encoder.variant == "ldm"  # type: ignore[union-attr]
    image, region = _image(1)[:32, :32], _region(1)[:32, :32]
    with Runtime.create(load_entrypoints=False, device="cpu", dtype="fp32") as runtime:
        out = get_task("inpaint")(
            InpaintRequest(model=str(result.export), steps=2, fit="pad"),
            runtime,
            inputs=TaskInputs(image=image, mask=region.astype(np.float32)),
        )
    assert out.manifest.extra["method"] == "model"
    assert np.array_equal(out.images[0][~region], image[~region])


class _Crop(Dataset[dict[str, Any]]):
    def __init__(self, data: InpaintItems, size: int) -> None:
        self.data, self.size = data, size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.data[i])
        item["image"] = item["image"][:, : self.size, : self.size]
        item["mask"] = item["mask"][:, : self.size, : self.size]
        return item


def test_hybrid_refusals(tmp_path: Path, sd_inpaint_model: Path, kl_f8: Path, kl_first_stage: Path) -> None:
    data = InpaintItems(4)
    args = _args(tmp_path, sd_inpaint_model, kl_f8, "--max-steps", "1")
    with pytest.raises(ValueError, match="concat part of a hybrid model needs a frozen, weight-free concat"):
        main([*args, "--concat-encoder", "class"], dataset=data)
    with pytest.raises(ValueError, match="the encoder concatenates 3"):
        main([*args, "--concat-encoder", "lowres"], dataset=data)
    with pytest.raises(ValueError, match="--cond-encoder is the cross-attention part"):
        main([*args, "--cond-encoder", "mask"], dataset=data)
    uncond = _args(tmp_path, Path("x"), kl_first_stage, "--max-steps", "1")
    uncond[1] = "tiny:ldm_kl_f4_uncond"
    with pytest.raises(ValueError, match="--concat-encoder 'mask' is for hybrid models"):
        main([*uncond, "--concat-encoder", "mask"], dataset=data)
