"""The training library pieces: EMA (LitEma schedule and CompVis names), condition dropout, the resumable
distributed order, batch collation, options from YAML and flags, RNG capture, atomic checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.testing.tiny import LDM_KL_F4_UNCOND
from ldm_sdk.training.batches import BatchStream, ResumableSampler, SyntheticImages, collate
from ldm_sdk.training.checkpointing import capture_rng, restore_rng
from ldm_sdk.training.config import BaseTrainConfig, parse_config
from ldm_sdk.training.diffusion_step import LatentDiffusionStep, SharedDraws, drop_conditions
from ldm_sdk.training.distributed import DistInfo
from ldm_sdk.training.ema import LitEma, decay_at


# -- EMA ---------------------------------------------------------------------------------------------------
def test_ema_follows_the_litema_schedule_in_closed_form() -> None:
    """For a parameter that is ``p_n`` at update ``n``: ``s_n = d_n s_{n-1} + (1 - d_n) p_n`` with
    ``d_n = min(decay, (1 + n) / (10 + n))``; checked against that recursion computed in float64."""
    model = nn.Linear(3, 2)
    ema = LitEma(model, decay=0.8)
    shadow = model.weight.detach().double().clone()
    for n in range(1, 40):
        with torch.no_grad():
            model.weight.add_(0.1 * n)
        d = min(0.8, (1 + n) / (10 + n))
        assert d == decay_at(0.8, n)
        shadow = d * shadow + (1 - d) * model.weight.detach().double()
        ema(model)
    assert int(ema.num_updates) == 39
    assert torch.allclose(ema.state_dict()["weight"].double(), shadow, rtol=1e-5, atol=1e-5)
    assert (1 + 1) / (10 + 1) < 0.8 < (1 + 39) / (10 + 39)  # both regimes of the min() were exercised


def test_ema_foreach_update_equals_the_compvis_per_parameter_loop_bit_for_bit() -> None:
    """The batched update against LitEma's own loop (``s.sub_((1 - d) * (s - p))`` per parameter), with a
    reload of the EMA state in between (the host mirror of ``num_updates`` must follow the loaded value)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
    ema = LitEma(model, decay=0.999)
    shadows = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        if step == 12:  # resume: a fresh EMA loaded from the state so far
            state = ema.bundle_weights()
            ema = LitEma(model, decay=0.5)
            ema.load_bundle_weights(state)
        ema(model)
        n_updates = step + 1
        d = 1.0 - min(0.999, (1 + n_updates) / (10 + n_updates))
        for n, p in model.named_parameters():
            shadows[n].sub_(d * (shadows[n] - p.detach()))
    assert int(ema.num_updates) == 25
    for n in shadows:
        assert torch.equal(getattr(ema, n.replace(".", "")), shadows[n]), n


def test_ema_without_update_counting_uses_the_decay_from_the_start() -> None:
    model = nn.Linear(2, 1, bias=False)
    ema = LitEma(model, decay=0.5, use_num_updates=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema(model)
    assert int(ema.num_updates) == -1
    assert torch.allclose(ema.state_dict()["weight"], start + 0.5)


def test_ema_names_are_the_compvis_model_ema_keys_of_the_bundle() -> None:
    bundle = ModelBundle(LDM_KL_F4_UNCOND)
    assert bundle.model is not None
    ema = LitEma(bundle.model)
    weights = ema.bundle_weights()
    bundle.snapshot_ema()  # the bundle's own CompVis naming
    assert weights.keys() == bundle.ema_weights.keys()
    assert set(bundle.ema_key_map()) <= weights.keys()
    assert (
        weights["model_ema.decay"].dtype == torch.float32
        and weights["model_ema.num_updates"].dtype == torch.int32
    )
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.add_(1.0)
    ema.copy_to(bundle.model)
    restored = LitEma(bundle.model)
    restored.load_bundle_weights(weights)
    assert all(
        torch.equal(a, b)
        for a, b in zip(restored.state_dict().values(), ema.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="do not fit"):
        restored.load_bundle_weights({"model_ema.decay": torch.tensor(0.9)})


def test_ema_average_parameters_restores_the_live_weights() -> None:
    model = nn.Linear(2, 2)
    ema = LitEma(model, decay=0.0, use_num_updates=False)
    live = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight.mul_(3)
    ema(model)
    with ema.average_parameters(model):
        assert torch.equal(model.weight, 3 * live[0])
    assert torch.equal(model.weight, 3 * live[0])


# -- condition dropout -------------------------------------------------------------------------------------
def test_condition_dropout_rate_and_rows() -> None:
    draws = SharedDraws(torch.Generator().manual_seed(0), DistInfo())
    drops = torch.cat([draws.bernoulli(0.1, 1000, torch.device("cpu")) for _ in range(20)])
    rate, sigma = float(drops.float().mean()), (0.1 * 0.9 / drops.numel()) ** 0.5
    assert abs(rate - 0.1) < 4 * sigma, rate
    cond, uncond = torch.ones(4, 3, 2), torch.zeros(1, 3, 2)
    out = drop_conditions(cond, uncond, torch.tensor([True, False, True, False]))
    assert out[:, 0, 0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_shared_draws_give_each_rank_its_rows_of_the_global_batch() -> None:
    def draw(info: DistInfo) -> torch.Tensor:
        return SharedDraws(torch.Generator().manual_seed(3), info).randn((2, 5), torch.device("cpu"))

    full = draw(DistInfo())  # one process drawing for a global batch of 2 ... with world 1
    one = SharedDraws(torch.Generator().manual_seed(3), DistInfo()).randn((4, 5), torch.device("cpu"))
    r0, r1 = draw(DistInfo(0, 2)), draw(DistInfo(1, 2))
    assert torch.equal(r0, one[0::2]) and torch.equal(r1, one[1::2]) and full.shape == (2, 5)


def test_trained_encoder_learns_its_null_embedding_through_dropout() -> None:
    from ldm_sdk.encoders.class_embedder import ClassEmbedder

    bundle = ModelBundle(LDM_KL_F4_UNCOND)
    encoder = ClassEmbedder(4, n_classes=3, uncond_class=2)
    seen = {}

    def model(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        seen["cond"] = cond
        return x * 0

    assert bundle.schedule is not None and bundle.config.diffusion is not None
    step = LatentDiffusionStep(model, bundle.schedule, bundle.config.diffusion, encoder=encoder)  # type: ignore[arg-type]
    z, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    step(z, torch.tensor([0, 1, 0]), t, torch.randn_like(z), torch.tensor([False, True, False]))
    context = seen["cond"].crossattn  # type: ignore[attr-defined]
    assert torch.equal(context[1], encoder.embedding.weight[2][None])
    assert torch.equal(context[0], encoder.embedding.weight[0][None])
    assert context.requires_grad


# -- data order --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_is_distributed_samplers_order_and_resumes_mid_epoch(world: int) -> None:
    for rank in range(world):
        ours = ResumableSampler(10, rank=rank, world_size=world, seed=4)
        theirs = DistributedSampler(range(10), num_replicas=world, rank=rank, seed=4, drop_last=True)  # type: ignore[arg-type]
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
        ours.set_epoch(1, start=2)
        assert list(ours) == list(theirs)[2:]


def test_batch_stream_position_round_trips() -> None:
    data = SyntheticImages(6, 8)

    def labels(stream: BatchStream, n: int) -> list[list[int]]:
        return [next(stream)["class_label"].tolist() for _ in range(n)]

    whole = labels(BatchStream(data, batch_size=2, seed=1), 7)  # 3 batches per epoch: crosses 2 epoch ends
    first = BatchStream(data, batch_size=2, seed=1)
    head = labels(first, 4)
    second = BatchStream(data, batch_size=2, seed=1)
    second.load_state(first.state())
    assert head + labels(second, 3) == whole
    with pytest.raises(ValueError, match="too few for one batch"):
        BatchStream(data, batch_size=4, world_size=2)


def test_collate_stacks_tensors_and_keeps_lists() -> None:
    items = [
        {"image": torch.zeros(3, 2, 2), "class_label": 1, "caption": "a", "boxes": [(0, 0, 1, 1)]},
        {"image": torch.ones(3, 2, 2), "class_label": 2, "caption": "b", "boxes": []},
    ]
    batch = collate(items)
    assert batch["image"].shape == (2, 3, 2, 2) and batch["class_label"].tolist() == [1, 2]
    assert batch["caption"] == ["a", "b"] and batch["boxes"] == [[(0, 0, 1, 1)], []]
    with pytest.raises(ValueError, match="different keys"):
        collate([items[0], {"image": torch.zeros(3, 2, 2)}])


# -- options -----------------------------------------------------------------------------------------------
class _Options(BaseTrainConfig):
    betas: tuple[float, float] = (0.5, 0.9)
    flag: bool = False
    name: str | None = None


def test_options_from_yaml_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("batch-size: 8\nlr: 3.0e-4\nbetas: [0.9, 0.99]\nname: yaml\n")
    cfg = parse_config(
        _Options, ["--config", str(config), "--lr", "1e-3", "--flag", "--name", "none"], prog="t"
    )
    assert (cfg.batch_size, cfg.lr, cfg.betas, cfg.flag, cfg.name) == (8, 1e-3, (0.9, 0.99), True, None)
    assert parse_config(_Options, ["--data-options", '{"mask": "box"}'], prog="t").data_options == {
        "mask": "box"
    }
    config.write_text("batch_sise: 8\n")
    with pytest.raises(ValueError, match="unknown options \\['batch_sise'\\]; valid options"):
        parse_config(_Options, ["--config", str(config)], prog="t")
    with pytest.raises(ValueError, match="--batch-size: Input should be greater than 0"):
        parse_config(_Options, ["--batch-size", "0"], prog="t")
    with pytest.raises(ValueError, match="--precision"):
        parse_config(_Options, ["--precision", "fp16"], prog="t")


# -- RNG ---------------------------------------------------------------------------------------------------
def test_rng_capture_restores_every_stream() -> None:
    g = torch.Generator().manual_seed(5)
    state = capture_rng({"g": g})
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    restore_rng(state, {"g": g})
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3])
    with pytest.raises(ValueError, match="no state for the generator 'other'"):
        restore_rng(state, {"other": torch.Generator()})
