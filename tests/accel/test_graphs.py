"""CapturedModel on the CPU: a transparent pass-through in "auto" mode; with mode="emulate" its static
buffers, signature cache and output modes are exercised (the GPU checks, run here in emulation), and every
refusal says what was wrong."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from ldm_sdk.accel import CapturedModel, CaptureError, accelerate_denoiser, bundle_denoiser
from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
from ldm_sdk.samplers.base import ddim_timesteps
from ldm_sdk.samplers.ddim import sample as ddim_sample
from ldm_sdk.testing.tiny import ALL, random_bundle
from tests.accel.capture_checks import (
    FAMILIES,
    check_cache_and_outputs,
    check_sampler_capture,
    check_unet_capture,
    guided_steps,
    random_inputs,
    run_ddim_cfg,
    tiny_bundle,
)

CPU = torch.device("cpu")


def affine(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    out = x * 2 + t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return out + cond.crossattn.mean() if cond.crossattn is not None else out


def inputs(batch: int = 2, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Conditioning]:
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.full((batch,), 3.0, dtype=torch.float64)
    return x, t, Conditioning(crossattn=torch.randn(batch, 5, 16, generator=g))


# -- pass-through ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["auto", "off"])
def test_cpu_is_a_pass_through(mode: str) -> None:
    calls: list[tuple[Tensor, Tensor, Conditioning]] = []

    def fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        calls.append((x, t, cond))
        return affine(x, t, cond)

    model = CapturedModel(fn, mode=mode)  # type: ignore[arg-type]
    x, t, cond = inputs()
    out = model(x, t, cond)
    # the very objects reach fn, and its output comes back untouched
    assert calls[0][0] is x and calls[0][1] is t and calls[0][2] is cond
    assert torch.equal(out, affine(x, t, cond))
    assert model.stats.passthrough == 1 and model.stats.captures == 0 and not model.signatures


def test_pass_through_keeps_autograd() -> None:
    """Off CUDA nothing is captured, so a caller that wants gradients still gets them."""
    x, t, cond = inputs()
    x.requires_grad_(True)
    CapturedModel(affine)(x, t, cond).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.full_like(x, 2.0))


def test_tiny_unet_pass_through_is_identical() -> None:
    bundle = random_bundle(ALL["sd1"])
    bundle.eval()
    fast = accelerate_denoiser(bundle)
    x, t, cond = random_inputs(bundle, 2, 16, CPU, torch.float32, seed=1)
    with torch.no_grad():
        assert torch.equal(fast(x, t, cond), bundle.apply_model(x, t, cond))
    assert fast.stats.passthrough == 1


# -- emulated capture: the GPU checks' logic on the CPU ----------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_emulated_unet_capture_equals_eager(family: str) -> None:
    check_unet_capture(CPU, torch.float32, "emulate", family)


def test_emulated_unet_capture_bf16() -> None:
    check_unet_capture(CPU, torch.bfloat16, "emulate", "sd1")


def test_emulated_ddim_cfg_equals_eager() -> None:
    check_sampler_capture(CPU, torch.float32, "emulate")


def test_emulated_cache_and_output_modes() -> None:
    check_cache_and_outputs(CPU, "emulate")


def test_pass_through_ddim_cfg_is_bit_identical() -> None:
    bundle = tiny_bundle("sd1", CPU, torch.float32)
    eager, _ = run_ddim_cfg(bundle, CPU, torch.float32, None, steps=5)
    fast, captured = run_ddim_cfg(bundle, CPU, torch.float32, "auto", steps=5)
    assert torch.equal(fast, eager)
    assert captured is not None
    (step,) = guided_steps(captured)
    assert step.stats.passthrough == len(ddim_timesteps(5))


def test_emulated_calls_work_in_and_out_of_inference_mode() -> None:
    model = CapturedModel(affine, mode="emulate")
    x, t, cond = inputs()
    with torch.inference_mode():
        first = model(x, t, cond)
    with torch.no_grad():
        second = model(x + 1, t, cond)
    assert torch.equal(first, affine(x, t, cond)) and torch.equal(second, affine(x + 1, t, cond))
    assert not second.is_inference()  # a clone made outside inference mode is an ordinary tensor
    assert model.stats.captures == 1 and model.stats.replays == 2


def test_signature_includes_layout_and_parts() -> None:
    model = CapturedModel(affine, mode="emulate")
    x, t, cond = inputs()
    with torch.no_grad():
        model(x, t, cond)
        model(x.contiguous(memory_format=torch.channels_last), t, cond)  # other strides: new capture
        model(x, t, Conditioning())  # other parts: new capture
        model(x, t.float(), cond)  # other t dtype: new capture
        model(x.clone(), t.clone(), Conditioning(crossattn=cond.crossattn.clone()))  # same signature
    assert model.stats.captures == 4 and model.stats.replays == 5
    assert "crossattn=[2, 5, 16] float32 on cpu" in str(model.signatures[0])


def test_clear_drops_captures() -> None:
    model = CapturedModel(affine, mode="emulate")
    with torch.no_grad():
        model(*inputs())
        model.clear()
        model(*inputs())
    assert model.stats.captures == 2 and not model.stats.evictions and len(model.signatures) == 1


def test_moved_weights_are_captured_again() -> None:
    """Graphs read the weights where they were at capture: after the model's weights move (a cast and back
    here; an offload to the CPU and back on a GPU) the wrapper captures again instead of replaying."""
    bundle = tiny_bundle("sd1", CPU, torch.float32)
    fast = accelerate_denoiser(bundle, mode="emulate")
    x, t, cond = random_inputs(bundle, 2, 16, CPU, torch.float32, seed=2)
    with torch.no_grad():
        first = fast(x, t, cond)
        fast(x, t, cond)
        assert fast.stats.captures == 1 and fast.stats.replays == 2
        # Same values, new memory. The old tensors are held so the allocator cannot hand their addresses back
        # to the cast (it did on CI, and a move back to the same addresses rightly replays).
        held = [p.detach() for p in bundle.model.parameters()]
        bundle.model.double().float()
        assert all(p.data_ptr() != h.data_ptr() for p, h in zip(bundle.model.parameters(), held, strict=True))
        again = fast(x, t, cond)
    assert fast.stats.captures == 2 and len(fast.signatures) == 1 and torch.equal(again, first)


def test_concurrent_calls_are_serialised() -> None:
    """Threads sharing one CapturedModel (the tasks keep one per model) never mix their inputs."""
    import threading

    model = CapturedModel(affine, mode="emulate")
    errors: list[str] = []

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(50):
            x, t = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), float(seed), dtype=torch.float64)
            cond = Conditioning(crossattn=torch.randn(2, 5, 16, generator=g))
            if not torch.equal(model(x, t, cond), affine(x, t, cond)):
                errors.append(f"thread {seed}")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    with torch.no_grad():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and model.stats.captures == 1 and model.stats.replays == 200


def test_bundle_denoiser_matches_bundle_denoiser_on_cpu() -> None:
    bundle = tiny_bundle("sd2_v", CPU, torch.float32)
    x, _, cond = random_inputs(bundle, 1, 16, CPU, torch.float32, seed=4)
    _, _, uncond = random_inputs(bundle, 1, 16, CPU, torch.float32, seed=5)
    ts = ddim_timesteps(4)
    with torch.no_grad():
        ref = ddim_sample(bundle.denoiser(cond, guidance_scale=3.0, uncond=uncond), x, ts)
        for mode in ("auto", "emulate"):
            den = bundle_denoiser(bundle, cond, guidance_scale=3.0, uncond=uncond, mode=mode)  # type: ignore[arg-type]
            assert torch.equal(ddim_sample(den, x, ts), ref)
        unguided = bundle_denoiser(bundle, cond, mode="emulate")
        assert torch.equal(ddim_sample(unguided, x, ts), ddim_sample(bundle.denoiser(cond), x, ts))


# -- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"mode": "fast"}, "valid: auto, graph, emulate, off"),
        ({"warmup": 0}, "warmup must be an int >= 1"),
        ({"max_graphs": 0}, "max_graphs must be an int >= 1"),
    ],
)
def test_bad_settings(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        CapturedModel(affine, **kwargs)  # type: ignore[arg-type]


def test_bad_fn_and_modules() -> None:
    with pytest.raises(TypeError, match="must be callable"):
        CapturedModel(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        CapturedModel(affine, modules=[object()])  # type: ignore[list-item]


def test_graph_mode_needs_cuda() -> None:
    with pytest.raises(CaptureError, match="mode='graph' captures CUDA graphs, but x is on cpu"):
        CapturedModel(affine, mode="graph")(*inputs())


def test_bad_inputs_are_refused() -> None:
    model = CapturedModel(affine, mode="emulate")
    x, t, cond = inputs()
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        model([1.0], t, cond)  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="t must be a tensor on x's device"):
        model(x, 3.0, cond)  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match="cond must be a Conditioning"):
        model(x, t, {"crossattn": cond.crossattn})  # type: ignore[arg-type]
    with pytest.raises(CaptureError, match=r"t is on meta"):
        model(x, torch.empty(2, device="meta"), cond)
    with pytest.raises(CaptureError, match="x requires grad"):
        model(x.clone().requires_grad_(True), t, cond)
    assert model.stats.captures == 0


def test_training_modules_are_refused() -> None:
    net = nn.Sequential(nn.Dropout(0.1))
    model = CapturedModel(lambda x, t, c: net(x), mode="emulate", modules=[net])
    with pytest.raises(CaptureError, match=r"training mode \(Sequential\).*\.eval\(\)"), torch.no_grad():
        model(*inputs())
    net.eval()
    with torch.no_grad():
        model(*inputs())
    net[0].train()  # a submodule switched back after the capture: caught when the graph is rebuilt
    model.clear()
    with pytest.raises(CaptureError, match=r"training mode \(Dropout\)"), torch.no_grad():
        model(*inputs())


def test_non_tensor_and_shape_changing_outputs_are_refused() -> None:
    with pytest.raises(CaptureError, match="fn must return a Tensor, got tuple"), torch.no_grad():
        CapturedModel(lambda x, t, c: (x,), mode="emulate")(*inputs())  # type: ignore[arg-type,return-value]
    sizes = iter([3, 2])
    model = CapturedModel(lambda x, t, c: x[:, : next(sizes)], mode="emulate")
    with pytest.raises(CaptureError, match="it is not shape-static"), torch.no_grad():
        model(*inputs())


def test_accelerate_denoiser_sources() -> None:
    bundle = random_bundle(ALL["sd1"])
    call = random_inputs(bundle, 2, 16, CPU, torch.float32, 0)
    with pytest.raises(CaptureError, match="training mode"), torch.no_grad():  # a fresh bundle trains
        accelerate_denoiser(bundle, mode="emulate")(*call)
    with pytest.raises(TypeError, match=r"bare UNetModel.*bind_unet"):
        accelerate_denoiser(bundle.unet)
    wrapper = accelerate_denoiser(bundle.model)  # an nn.Module called as module(x, t, cond)
    assert wrapper.modules == (bundle.model,)
    fn = accelerate_denoiser(bind_unet(bundle.unet, "crossattn"), modules=[bundle.unet])
    assert fn.modules == (bundle.unet,)
    with pytest.raises(TypeError, match="source must be a ModelBundle"):
        accelerate_denoiser(3)  # type: ignore[arg-type]
    first_stage_only = random_bundle(ALL["kl_f8_first_stage"])
    with pytest.raises(ValueError, match="first-stage-only"):
        accelerate_denoiser(first_stage_only)
    with pytest.raises(ValueError, match="first-stage-only"):
        bundle_denoiser(first_stage_only, Conditioning())
    with pytest.raises(ValueError, match="needs the unconditional conditioning"):
        bundle_denoiser(bundle, Conditioning(), guidance_scale=2.0)


# -- the CUDA code path, driven through fakes of torch.cuda (control flow and API names, not the GPU) --------
class _FakeStream:
    def __init__(self, *args: object, **kwargs: object) -> None:
        self.waited: list[object] = []

    def wait_stream(self, other: object) -> None:
        self.waited.append(other)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[object]]:
    """torch.cuda's stream / graph / sync-debug API replaced by recorders; CapturedModel treats CPU
    tensors as capturable. The real names must exist (a renamed torch API fails here, not on the GPU)."""
    import contextlib

    names = ["device", "current_stream", "Stream", "stream", "CUDAGraph", "graph"]
    names += ["get_sync_debug_mode", "set_sync_debug_mode", "is_current_stream_capturing"]
    missing = [name for name in names if not hasattr(torch.cuda, name)]
    assert not missing, f"torch.cuda lacks {missing}"
    log: dict[str, list[object]] = {"events": [], "sync_modes": [], "mode_now": [0]}

    class FakeGraph:
        def __init__(self, keep_graph: bool = False) -> None:
            log["events"].append("graph")
            self.keep_graph = keep_graph

        def instantiate(self) -> None:
            assert self.keep_graph, "instantiate() of a graph captured without keep_graph"
            log["events"].append("instantiate")

        def replay(self) -> None:
            log["events"].append("replay")

        def reset(self) -> None:
            log["events"].append("reset")

    @contextlib.contextmanager
    def graph(g: object, *args: object, **kwargs: object) -> Iterator[None]:
        log["events"].append("capture_begin")
        yield
        log["events"].append("capture_end")

    def set_mode(mode: object) -> None:
        log["sync_modes"].append(mode)
        log["mode_now"][0] = mode

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _FakeStream())
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: log["mode_now"][0])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    monkeypatch.setattr(CapturedModel, "_active", lambda self, x: True)
    return log


def test_graph_path_warms_up_captures_and_replays(fake_cuda: dict[str, list[object]]) -> None:
    seen_modes: list[object] = []

    def fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        seen_modes.append(fake_cuda["mode_now"][0])
        return affine(x, t, cond)

    model = CapturedModel(fn, mode="graph", warmup=2, max_graphs=1)
    x, t, cond = inputs()
    with torch.no_grad():
        out = model(x, t, cond)  # warm-up x2, capture (its run computes the static output), replay
    assert torch.equal(out, affine(x, t, cond))
    assert seen_modes == [0, "error", 0], "only the last warm-up runs under sync debug mode 'error'"
    # kept un-instantiated at capture end (its memset nodes rewritten), then instantiated
    assert fake_cuda["events"] == ["graph", "capture_begin", "capture_end", "instantiate", "replay"]
    with torch.no_grad():
        model(x + 1, t, cond)  # same signature: copy in, replay, no new call of fn
        model(*inputs(3))  # a new signature evicts the old capture (max_graphs=1)
    assert len(seen_modes) == 6
    assert fake_cuda["events"][5:] == [
        "replay",
        "reset",
        "graph",
        "capture_begin",
        "capture_end",
        "instantiate",
        "replay",
    ]
    assert model.stats.captures == 2 and model.stats.replays == 3 and model.stats.evictions == 1


@pytest.mark.parametrize(
    ("fail_on_call", "message", "error", "words"),
    [
        (2, "called a synchronizing CUDA operation", CaptureError, "synchronizes the host with the GPU"),
        (3, "operation not permitted when stream is capturing", CaptureError, "CUDA graph capture of fn"),
        (1, "mat1 and mat2 shapes cannot be multiplied", RuntimeError, "mat1 and mat2"),  # a model bug
    ],
)
def test_graph_path_errors(
    fake_cuda: dict[str, list[object]], fail_on_call: int, message: str, error: type, words: str
) -> None:
    calls = []

    def fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        calls.append(1)
        if len(calls) == fail_on_call:
            raise RuntimeError(message)
        return x

    model = CapturedModel(fn, mode="graph", warmup=2)
    with pytest.raises(error, match=words), torch.no_grad():
        model(*inputs())
    assert fake_cuda["mode_now"][0] == 0, "the sync debug mode is restored"
    assert not model.signatures and model.stats.captures == 0


def test_models_sharing_a_pool_share_its_lock() -> None:
    """``pool=SharedGraphPool()``: the models' calls are serialised together (one lock); without it each
    model has its own."""
    from ldm_sdk.accel.graphs import SharedGraphPool

    pool = SharedGraphPool()
    a = CapturedModel(lambda x, t, c: x * 2, mode="emulate", pool=pool)
    b = CapturedModel(lambda x, t, c: x + 1, mode="emulate", pool=pool)
    alone = CapturedModel(lambda x, t, c: x - 1, mode="emulate")
    assert a._lock is b._lock is pool.lock and alone._lock is not pool.lock and alone.pool is None


def pool_case(shared: bool) -> tuple[int, bool]:
    """Two captured models, sharing one pool or each with its own: the memory they reserve (with the
    allocator's free blocks returned) and whether every replay equalled its eager call. Run in a fresh
    process by the test below, so that no pool or cached block of the other case is counted."""
    from ldm_sdk.accel.graphs import SharedGraphPool

    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(8, 8, 3, padding=1).cuda().eval() for _ in range(2)]

    def deep(conv: torch.nn.Conv2d) -> Callable[[Tensor, Tensor, Conditioning], Tensor]:
        def fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            for _ in range(6):  # temporaries the pool holds
                x = torch.tanh(conv(x)) + x
            return x

        return fn

    xs = [torch.randn(4, 8, 256, 256, device="cuda") for _ in range(3)]
    t, cond = torch.zeros(4, device="cuda"), Conditioning()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    pool = SharedGraphPool() if shared else None
    models = [CapturedModel(deep(c), pool=pool, modules=[c]) for c in convs]
    ok = True
    with torch.inference_mode():
        for order in ([0, 1], [1, 0], [0, 0, 1, 1, 0]):
            for i in order:
                for x in xs:
                    ok &= torch.equal(models[i](x, t, cond), deep(convs[i])(x, t, cond))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved() - before, ok


@pytest.mark.gpu
def test_cuda_captures_sharing_a_pool_replay_in_any_order() -> None:
    """Two models whose graphs share one memory pool (as a model's first-stage encode and decode do):
    captured one after the other, replayed interleaved and in both orders, each equals its eager call bit
    for bit, and together they reserve less memory than with a pool each. Each case runs in a process of
    its own: in one process the first case's pool and cached blocks blurred the second's figure."""
    import json
    import subprocess
    import sys

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    results = {}
    for shared in (True, False):
        code = f"import json, tests.accel.test_graphs as m; print(json.dumps(m.pool_case({shared})))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        results[shared] = json.loads(out.stdout.strip().splitlines()[-1])
    (shared_bytes, shared_ok), (separate_bytes, separate_ok) = results[True], results[False]
    assert shared_ok and separate_ok, "a replay differs from its eager call"
    assert shared_bytes < separate_bytes, (shared_bytes, separate_bytes)
    print(f"shared pool {shared_bytes >> 20} MiB, separate pools {separate_bytes >> 20} MiB")
