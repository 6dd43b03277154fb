"""Registry: registration, attribution, lookups whose errors list the known names."""

from __future__ import annotations

import functools

import pytest

from ldm_sdk.registry import DuplicateNameError, Registries, Registry, UnknownNameError


def ddim() -> None:
    """Denoising diffusion implicit models.

    More text that is not the description.
    """


def plms() -> None:
    """Pseudo linear multistep."""


def make() -> Registry[object]:
    reg: Registry[object] = Registry("sampler")
    reg.add("ddim", ddim, plugin="builtin")
    reg.add("plms", plms, plugin="builtin")
    reg.add("euler", functools.partial(plms), plugin="k-plugin", description="Euler (Karras et al.)")
    return reg


def test_get_returns_the_registered_factory() -> None:
    reg = make()
    assert reg.get("ddim") is ddim
    assert reg.entry("plms").plugin == "builtin"


def test_unknown_name_is_a_key_error_listing_known_names_and_close_matches() -> None:
    reg = make()
    with pytest.raises(KeyError) as info:
        reg.get("dim")
    err = info.value
    assert isinstance(err, UnknownNameError)
    assert err.known == ["ddim", "euler", "plms"]
    assert str(err) == "unknown sampler 'dim' (did you mean 'ddim'?); known: ddim, euler, plms"


def test_unknown_name_in_empty_registry_says_nothing_is_registered() -> None:
    with pytest.raises(UnknownNameError, match="no schedule is registered"):
        Registry("schedule").get("linear")


def test_duplicate_names_both_plugins_and_keeps_the_first() -> None:
    reg = make()
    with pytest.raises(DuplicateNameError) as info:
        reg.add("ddim", plms, plugin="third-party")
    message = str(info.value)
    assert "'builtin'" in message and "'third-party'" in message and "'ddim'" in message
    assert reg.get("ddim") is ddim


def test_replace_overrides_on_purpose() -> None:
    reg = make()
    reg.add("ddim", plms, plugin="third-party", replace=True)
    assert reg.get("ddim") is plms
    assert reg.entry("ddim").plugin == "third-party"


def test_attributing_sets_the_default_plugin() -> None:
    reg: Registry[object] = Registry("task")
    with reg.attributing("plugin-a"):
        reg.add("txt2img", ddim)
        reg.add("other", plms, plugin="explicit")
    reg.add("later", plms)
    assert reg.entry("txt2img").plugin == "plugin-a"
    assert reg.entry("other").plugin == "explicit"
    assert reg.entry("later").plugin == "<unattributed>"


@pytest.mark.parametrize("bad", ["", " ddim", "dd im", "-x", "a/b"])
def test_invalid_names_are_refused_with_the_rule(bad: str) -> None:
    with pytest.raises(ValueError, match="use letters, digits"):
        Registry("sampler").add(bad, ddim)


def test_none_factory_is_refused() -> None:
    with pytest.raises(ValueError, match="factory is None"):
        Registry("sampler").add("x", None)


def test_iteration_listing_and_removal() -> None:
    reg = make()
    assert list(reg) == ["ddim", "euler", "plms"]
    assert len(reg) == 3 and "euler" in reg and "nope" not in reg
    assert reg.describe() == [
        {"name": "ddim", "plugin": "builtin", "description": "Denoising diffusion implicit models."},
        {"name": "euler", "plugin": "k-plugin", "description": "Euler (Karras et al.)"},
        {"name": "plms", "plugin": "builtin", "description": "Pseudo linear multistep."},
    ]
    assert reg.by_plugin("builtin") == ["ddim", "plms"]
    assert reg.remove_plugin("builtin") == ["ddim", "plms"]
    assert reg.names() == ["euler"]


def test_registries_has_one_registry_per_registration_hook() -> None:
    regs = Registries.empty()
    assert Registries.kinds() == [
        "samplers",
        "schedules",
        "checkpoint_formats",
        "model_families",
        "condition_encoders",
        "tasks",
        "host_adapters",
    ]
    assert regs.by_kind("tasks") is regs.tasks
    with pytest.raises(UnknownNameError, match="known: samplers, schedules"):
        regs.by_kind("sampler")
