"""Our nodes under ComfyUI's TorchCompileModel, before and after it in the graph, on a tiny Wan 2.1:
the compiled run equals the eager one, ours still acts, and nothing compiles again after the first
steps. Apart from the other stacking tests (test_core_stacking.py) so that the test processes can
run them side by side: compiling is the slowest thing the suite does."""

import shutil

import pytest
import torch

from support.node_calls import comfy_extra, run_node
from support.stacking import ORDERS, OURS, ModelCalls, assert_effect, sample, stack


def _needs_compiler():
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: inductor cannot build CPU kernels (install g++, e.g. apt-get install build-essential)")


def _compile(model, backend="inductor"):
    TorchCompileModel = comfy_extra("nodes_torch_compile", "TorchCompileModel")
    return run_node(TorchCompileModel, model=model, backend=backend)[0]


@pytest.fixture(scope="module")
def compile_wan():
    """A tiny Wan 2.1 of 2 blocks instead of 4: Dynamo traces every block alike (the same hooks, the
    same graph breaks), so two show what four do at half the tracing."""
    from support import tiny_models
    return tiny_models.bench_wan(layers=2, ffn=512)


@pytest.fixture
def dynamo_counters():
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def _graphs(counters) -> int:
    return int(counters["stats"]["unique_graphs"])


# What meets our hooks is TorchDynamo (tracing, guards, graph breaks), the same whatever backend turns
# its graphs into kernels: the node-and-order matrix runs on Dynamo's "eager" backend (graphs run as
# traced), except one case on the inductor backend that TorchCompileModel uses by default, whose kernel
# generation and C++ builds take most of a compiled test's time on CPU. That case checks all an eager
# one would, so its node and order do not run on "eager" as well.
INDUCTOR_CASE = ("entropy_guidance", ORDERS[1])
COMPILE_CASES = [("inductor" if (node, order) == INDUCTOR_CASE else "eager", node, order)
                 for node in sorted(OURS) for order in ORDERS]


@pytest.mark.compile
@pytest.mark.parametrize("backend,node,order", COMPILE_CASES)
def test_torch_compile(compile_wan, backend, node, order, dynamo_counters):
    """The compiled run equals the eager run, ours changes the compiled result, and compiling happens
    in the first step(s) only: the last step of a run and a second run compile nothing new. The
    tolerance is inductor's own reordering of the plain model's float sums (within it on the tiny
    Wan); Dynamo's eager backend runs the traced graph as it is."""
    if backend == "inductor":
        _needs_compiler()
    ours = OURS[node]
    steps = 3  # IE-Adapt's registry step evaluates other batch sizes than the steps after it
    eager_plain, eager = sample(compile_wan, steps=steps), sample(ours(compile_wan), steps=steps)
    graphs_after_call = []
    recorder = ModelCalls(after=lambda record: graphs_after_call.append(_graphs(dynamo_counters)))
    model = recorder(stack(ours, lambda m: _compile(m, backend), compile_wan, order))
    compiled = sample(model, steps=steps)
    first_run = _graphs(dynamo_counters)
    calls_per_run = len(recorder.calls)
    second = sample(model, steps=steps)
    breaks = dict(dynamo_counters["graph_break"])
    summary = (f"{node} ({order}, {backend}): graphs compiled after each model call {graphs_after_call} "
               f"(first run: {calls_per_run} calls), graph breaks {sum(breaks.values())}: {breaks}")
    print(summary)
    assert first_run > 0, f"nothing was compiled: {summary}"
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)
    assert torch.equal(second, compiled)
    assert_effect(compiled, eager_plain, f"{node} under torch.compile")
    last_sigma = recorder.calls[calls_per_run - 1]["sigma"]
    last_step_calls = sum(c["sigma"] == last_sigma for c in recorder.calls[:calls_per_run])
    before_last_step = graphs_after_call[calls_per_run - last_step_calls - 1]
    assert graphs_after_call[calls_per_run - 1] == before_last_step, f"the last step compiled again: {summary}"
    assert _graphs(dynamo_counters) == first_run, f"a second sampling run compiled again: {summary}"
