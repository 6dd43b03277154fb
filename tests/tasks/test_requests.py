"""Request schemas: defaults, validation messages, seeds; sampling plans from a request."""

from __future__ import annotations

import pytest

from ldm_sdk.tasks.base import (
    ClassRequest,
    InpaintRequest,
    TaskError,
    Txt2ImgRequest,
    format_validation_error,
    parse_request,
)
from ldm_sdk.tasks.sampling import plan_sampling, sampler_function
from ldm_sdk.testing.tiny import LDM_KL_F4_UNCOND, random_bundle


def test_defaults_and_seeds() -> None:
    r = Txt2ImgRequest(prompt="a cat", seed=7, batch=3)
    assert r.seeds() == [7, 8, 9]
    assert r.sampler == "ddim" and r.steps is None and r.guidance is None and r.model is None
    assert InpaintRequest().fit == "error" and InpaintRequest().method == "auto"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompt": "x", "steps": 0}, "steps: Input should be greater than or equal to 1"),
        ({"prompt": "x", "batch": 65}, "batch: Input should be less than or equal to 64"),
        ({"prompt": "x", "seed": -1}, "seed: Input should be greater than or equal to 0"),
        ({"prompt": "x", "colour": "red"}, "unknown field 'colour'"),
        ({}, "prompt: required"),
        ({"prompt": "   "}, "the prompt is empty"),
        ({"prompt": "x", "dtype": "int8"}, "unknown dtype 'int8'; valid: fp32, fp16, bf16"),
        (
            {"prompt": "x", "spacing": "cosine"},
            "spacing: Input should be 'uniform', 'quad', 'linspace' or 'karras'",
        ),
        ({"prompt": "x", "model": ""}, "model: must not be empty"),
    ],
)
def test_invalid_requests_say_what_is_valid(data: dict[str, object], message: str) -> None:
    with pytest.raises(TaskError, match="invalid txt2img request") as info:
        parse_request(Txt2ImgRequest, data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_dtype_aliases_normalised() -> None:
    assert Txt2ImgRequest(prompt="x", dtype="float16").dtype == "fp16"  # type: ignore[arg-type]
    assert Txt2ImgRequest(prompt="x", dtype="bfloat16").dtype == "bf16"  # type: ignore[arg-type]


def test_strength_range() -> None:
    from pydantic import ValidationError

    from ldm_sdk.tasks.base import Img2ImgRequest

    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValidationError) as info:
            Img2ImgRequest(strength=bad)
        assert "strength" in format_validation_error(info.value)
    assert Img2ImgRequest(strength=1.0).strength == 1.0


def test_class_request_needs_label() -> None:
    with pytest.raises(TaskError, match="class_label: required"):
        parse_request(ClassRequest, {})


# -- sampling plans ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schedule():  # type: ignore[no-untyped-def]
    return random_bundle(LDM_KL_F4_UNCOND).schedule


def test_plan_defaults(schedule) -> None:  # type: ignore[no-untyped-def]
    from ldm_sdk.samplers.base import ddim_timesteps, karras_timesteps, linspace_timesteps

    ddim = plan_sampling(Txt2ImgRequest(prompt="x", steps=10), schedule)
    assert ddim.spacing == "uniform" and ddim.timesteps.equal(ddim_timesteps(10, 1000))
    plms = plan_sampling(Txt2ImgRequest(prompt="x", steps=10, sampler="plms", spacing="quad"), schedule)
    assert plms.timesteps.equal(ddim_timesteps(10, 1000, "quad"))
    dpm = plan_sampling(Txt2ImgRequest(prompt="x", steps=10, sampler="dpmpp_2m"), schedule)
    assert dpm.spacing == "karras" and dpm.timesteps.equal(karras_timesteps(schedule, 10))
    euler = plan_sampling(Txt2ImgRequest(prompt="x", steps=10, sampler="euler_ancestral"), schedule)
    assert euler.spacing == "linspace" and euler.timesteps.equal(linspace_timesteps(10, 1000))
    lin = plan_sampling(
        Txt2ImgRequest(prompt="x", steps=10, sampler="dpmpp_2m", spacing="linspace"), schedule
    )
    assert lin.timesteps.equal(linspace_timesteps(10, 1000, include_zero=False))
    assert plan_sampling(Txt2ImgRequest(prompt="x"), schedule).steps == 50


def test_ddpm_runs_every_timestep(schedule) -> None:  # type: ignore[no-untyped-def]
    plan = plan_sampling(Txt2ImgRequest(prompt="x", sampler="ddpm"), schedule)
    assert plan.steps == 1000 and plan.timesteps[0] == 999 and plan.timesteps[-1] == 0
    with pytest.raises(TaskError, match="leave steps unset or pass 1000"):
        plan_sampling(Txt2ImgRequest(prompt="x", sampler="ddpm", steps=20), schedule)
    with pytest.raises(TaskError, match="takes no spacing"):
        plan_sampling(Txt2ImgRequest(prompt="x", sampler="ddpm", spacing="karras"), schedule)


def test_too_many_steps(schedule) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TaskError, match="at most the model's 1000 timesteps"):
        plan_sampling(Txt2ImgRequest(prompt="x", steps=2000), schedule)


def test_unknown_sampler_lists_known(ldm_runtime) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TaskError, match=r"unknown sampler 'dddim'.*did you mean 'ddim'"):
        sampler_function("dddim", ldm_runtime.registries.samplers)
    with pytest.raises(TaskError, match="known: ddim, ddpm"):
        sampler_function("nope")
