"""A capture that runs out of GPU memory (``ldm_sdk.accel.graphs.CapturedModel``): the model releases its own
and its companions' other captures and tries once more.

CPU, the emulated capture, with a network that raises torch's CUDA out-of-memory error while the family
holds "too many" graphs (the state a GPU of limited memory reaches after a few image sizes): the retry
succeeds and equals the eager call, the released captures are counted, a companion in use by another
thread keeps its graphs, and where nothing can be released, or the retry fails too, the error is a
``CaptureMemoryError``. GPU (mark ``gpu``): the same with a real out-of-memory under a per-process memory
limit, the graph to release held by the model itself or by another model joined to it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel.graphs import CapturedModel, CaptureError, CaptureMemoryError
from ldm_sdk.diffusion.conditioning import Conditioning

COND = Conditioning()


def network(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    return torch.tanh(x) * 2 + t.reshape(-1, *([1] * (x.dim() - 1)))


class Limited:
    """``network`` whose capture of a new batch size runs out of memory while the family already holds
    ``room`` captures (its replays of held sizes always fit)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.models: list[CapturedModel] = []
        self.failures = 0

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        held = [sig.x.shape[0] for m in self.models for sig in m._captures]
        if x.shape[0] not in held and len(held) >= self.room:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake: {len(held)} graphs held)")
        return network(x, t, cond)


def inputs(batch: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 3, 4, 4, generator=g), torch.full((batch,), 7.0)


def family(room: int) -> tuple[Limited, CapturedModel, CapturedModel]:
    fn = Limited(room)
    parent = CapturedModel(fn, mode="emulate")
    companion = parent.companion("wrapped", lambda f: f)
    fn.models = [parent, companion]
    return fn, parent, companion


def test_out_of_memory_releases_the_familys_other_graphs_and_retries() -> None:
    fn, parent, companion = family(room=2)
    with torch.inference_mode():
        for batch in (1, 2):  # one graph each: the family is full
            parent(*inputs(batch), COND)
        x, t = inputs(3)
        assert torch.equal(companion(x, t, COND), network(x, t, COND))  # runs out once, then fits
        assert fn.failures == 1 and parent.stats.memory_releases == 2
        assert len(companion.signatures) == 1 and not parent.signatures
        fn.room = 1
        x, t = inputs(4)
        assert torch.equal(parent(x, t, COND), network(x, t, COND))  # the companion's graph in the way now
        assert fn.failures == 2 and companion.stats.memory_releases == 1
        assert len(parent.signatures) == 1 and not companion.signatures
        assert parent.stats.evictions == 2 and companion.stats.evictions == 1


def test_nothing_to_release_or_a_second_failure_is_a_capture_memory_error() -> None:
    fn, parent, _ = family(room=0)  # nothing fits
    with torch.inference_mode(), pytest.raises(CaptureMemoryError, match="holds no other graph"):
        parent(*inputs(1), COND)
    assert fn.failures == 1  # no retry without anything released

    fn, parent, companion = family(room=2)
    with torch.inference_mode():
        parent(*inputs(1), COND)
        parent(*inputs(2), COND)
        fn.room = 0  # now nothing fits at all
        with pytest.raises(CaptureMemoryError, match="even after releasing 2 other graph") as info:
            companion(*inputs(3), COND)
    assert isinstance(info.value, CaptureError) and isinstance(
        info.value.__cause__, torch.cuda.OutOfMemoryError
    )
    assert fn.failures == 2


def test_a_companion_in_use_by_another_thread_keeps_its_graphs() -> None:
    fn, parent, companion = family(room=2)
    with torch.inference_mode():
        companion(*inputs(1), COND)
        parent(*inputs(2), COND)
    assert fn.failures == 0
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with companion._lock:  # as a replay in another thread does
            holding.set()
            done.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert holding.wait(10)
        # the new capture fits once the parent's own graph is gone; the busy companion keeps its own
        with torch.inference_mode():
            x, t = inputs(3)
            assert torch.equal(parent(x, t, COND), network(x, t, COND))
        assert fn.failures == 1 and parent.stats.memory_releases == 1
        assert companion.stats.memory_releases == 0 and len(companion._captures) == 1
    finally:
        done.set()
        worker.join(10)


def test_models_released_together_share_one_family() -> None:
    """``release_together`` (a model's UNet and first-stage captures): an out-of-memory capture of one
    releases the other's graphs, companions made after the join included."""
    fn, unet, early = family(room=2)
    decoder = CapturedModel(fn, mode="emulate")
    fn.models.append(decoder)
    unet.release_together(decoder)
    unet.release_together(decoder)  # idempotent
    late = unet.companion("late", lambda f: f)
    fn.models.append(late)
    assert all(m._family is unet._family for m in (early, decoder, late)) and len(unet._members()) == 4
    with torch.inference_mode():
        unet(*inputs(1), COND)
        late(*inputs(2), COND)
        x, t = inputs(3)
        assert torch.equal(decoder(x, t, COND), network(x, t, COND))
    assert fn.failures == 1 and unet.stats.memory_releases == late.stats.memory_releases == 1
    assert len(decoder.signatures) == 1 and not unet.signatures and not late.signatures


def test_no_reference_cycle_keeps_a_dropped_model_alive() -> None:
    """A family refers to its members weakly and a capture's replay takes the capture as an argument: a
    dropped model (its graphs, static buffers and network) is freed at once, without the cycle collector,
    as the runtime's cache expects when a model leaves the GPU."""
    import gc
    import weakref

    parent = CapturedModel(network, mode="emulate")
    companion = parent.companion("wrapped", lambda f: f)
    other = CapturedModel(network, mode="emulate")
    parent.release_together(other)
    with torch.inference_mode():
        for model in (parent, companion, other):
            model(*inputs(2), COND)
    refs = [weakref.ref(m) for m in (parent, companion, other)]
    capture_ref = weakref.ref(next(iter(parent._captures.values())))
    gc.disable()
    try:
        del parent, companion
        assert refs[0]() is None and refs[1]() is None and capture_ref() is None
        assert refs[2]() is other and [m is other for m in other._members()] == [True]
    finally:
        gc.enable()


@pytest.mark.gpu
@pytest.mark.parametrize("holder", ["itself", "joined model"])
def test_cuda_capture_fits_after_the_other_graphs_are_released(holder: str) -> None:
    """A real out-of-memory: with the process limited to what one more capture cannot fit beside the graph
    held already -- by the same model, or by another model joined to it (``release_together``, as the
    tasks join the networks of the models on one GPU) -- the new capture fails once, releases that graph,
    and then replays its eager call bit for bit."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(64, 64, 3, padding=1).cuda().half().eval() for _ in range(2)]

    def deep(conv: torch.nn.Conv2d) -> Callable[[Tensor, Tensor, Conditioning], Tensor]:
        def call(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
            for _ in range(6):
                x = torch.tanh(conv(x)) + x
            return x

        return call

    first = CapturedModel(deep(convs[0]), modules=[convs[0]])
    second = first
    if holder == "joined model":
        second = CapturedModel(deep(convs[1]), modules=[convs[1]])
        second.release_together(first)
    x1 = torch.randn(8, 64, 192, 192, device="cuda", dtype=torch.half)
    x2 = x1.contiguous(memory_format=torch.channels_last)  # the same sizes, another signature
    t = torch.zeros(8, device="cuda")
    with torch.inference_mode():
        want = second.fn(x2, t, COND)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
        assert torch.equal(first(x1, t, COND), first.fn(x1, t, COND))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        after = torch.cuda.memory_reserved()
        graph_bytes = after - before
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction((after + graph_bytes // 2) / total)
        try:
            got = second(x2, t, COND)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
    assert second.stats.captures == (2 if second is first else 1), second.stats
    assert first.stats.memory_releases == 1, first.stats
    assert [sig.x.stride for sig in second.signatures] == [x2.stride()]  # only the new graph is held
    if second is not first:
        assert first.signatures == []
    assert torch.equal(got, want)
    print(f"graph held by {holder}: {graph_bytes >> 20} MiB; the new signature captured after releasing it")
