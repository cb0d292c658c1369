"""The hybrid's CPU part inside CUDA graphs (hybrid_graph.py, host_nodes.py): the semaphores the
host nodes post and wait on, the worker's hand-off in capture order, and a failure in the CPU part
raised in the caller without hanging the stream; on a GPU, graph decode with CPU experts equals
eager decode."""

from __future__ import annotations

import ctypes
import threading
import time

import pytest
import torch

from expertlora.host_nodes import HostNodesUnavailable, Semaphore, _library, set_spin
from expertlora.hybrid_graph import GraphCpuPart, HostCall, KernelHostCalls, host_calls_in_kernel

from .conftest import FAMILIES

if isinstance(_library(), HostNodesUnavailable):
    pytest.skip(f"host_sync.c does not build here: {_library()}", allow_module_level=True)

HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@pytest.fixture(params=[(0, 0), (20_000, 20_000)], ids=["blocking", "polling first"])
def spin(request):
    """Each wait blocks at once, or polls 20 ms first (longer than the posts below take to come)."""
    set_spin(*request.param)
    yield request.param
    set_spin(0, 0)


def test_semaphore_post_wait_and_timeout(spin):
    s = Semaphore()
    start = time.monotonic()
    assert s.wait(0.05) is False and time.monotonic() - start >= 0.04
    s.post()
    s.post()
    assert s.wait(1.0) and s.wait(1.0) and not s.wait(0.01)


def test_host_functions_called_as_cuda_calls_them(spin):
    """The C functions behind the host nodes, called through their raw addresses from another
    thread (as the driver's callback thread does): post releases a waiter, wait blocks until posted."""
    lib = _library()
    post, wait = (HOST_FN(ctypes.cast(fn, ctypes.c_void_p).value) for fn in (lib.el_post, lib.el_wait))
    ready, done = Semaphore(), Semaphore()
    order = []

    def stream():
        post(ready.address)
        order.append("posted")
        wait(done.address)  # blocks until the host thread is done
        order.append("released")

    t = threading.Thread(target=stream)
    t.start()
    assert ready.wait(5.0)
    time.sleep(0.05)
    assert order == ["posted"]  # still waiting on done
    done.post()
    t.join(5.0)
    assert order == ["posted", "released"] and not t.is_alive()


def _calls(n: int, T: int = 3, H: int = 8):
    g = torch.Generator().manual_seed(n)
    return [HostCall(layer, torch.randn(T, H, generator=g), torch.randint(0, 4, (T, 2), generator=g), torch.rand(T, 2, generator=g),
                     None, torch.empty(T, H), Semaphore(), Semaphore()) for layer in range(n)]


def _fake_stream(calls, log):
    """What a replayed graph does: per call, post ready, "GPU work", wait for done, read out."""
    lib = _library()
    post, wait = (HOST_FN(ctypes.cast(fn, ctypes.c_void_p).value) for fn in (lib.el_post, lib.el_wait))

    def run():
        for c in calls:
            post(c.ready.address)
            wait(c.done.address)
            log.append((c.layer, c.out.clone()))

    return threading.Thread(target=run)


def test_calls_run_in_capture_order():
    seen, threads = [], set()

    def cpu_part(call):
        seen.append(call.layer)
        threads.add(threading.get_ident())
        return call.x * call.weights.sum(1, keepdim=True) + call.layer

    part = GraphCpuPart(cpu_part)
    for step in range(3):  # the same captured calls, replayed again and again
        calls, log = _calls(4), []
        stream = _fake_stream(calls, log)
        part.run_replay(calls, stream.start, lambda: stream.join(10))
        assert [layer for layer, _ in log] == [0, 1, 2, 3]
        for c, (_, out) in zip(calls, log):
            assert torch.equal(out, c.x * c.weights.sum(1, keepdim=True) + c.layer)
    assert seen == [0, 1, 2, 3] * 3
    assert len(threads) == 1 and threading.get_ident() not in threads  # served by one worker, not the replaying thread


def test_failure_in_the_cpu_part_is_raised_and_the_stream_finishes():
    def cpu_part(call):
        if call.layer == 1:
            raise ValueError("kernel says no")
        return call.x

    part = GraphCpuPart(cpu_part)
    calls, log = _calls(3), []
    stream = _fake_stream(calls, log)
    with pytest.raises(RuntimeError, match="kernel says no"):
        part.run_replay(calls, stream.start, lambda: stream.join(10))
    assert not stream.is_alive() and [layer for layer, _ in log] == [0, 1, 2]
    # the part still serves the next replay
    calls, log = _calls(1), []
    stream = _fake_stream(calls, log)
    part.run_replay(calls, stream.start, lambda: stream.join(10))
    assert torch.equal(log[0][1], calls[0].x)


def test_inputs_that_never_arrive_are_an_error(monkeypatch):
    """A launch that never reaches the host nodes: the replay fails after the timeout, no hang."""
    monkeypatch.setattr("expertlora.hybrid_graph.READY_TIMEOUT_S", 0.05)
    part = GraphCpuPart(lambda call: call.x)
    with pytest.raises(RuntimeError, match="layer 0: its inputs never arrived"):
        part.run_replay(_calls(2), lambda: None, lambda: None)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_host_nodes_in_a_replayed_graph():
    """The mechanism alone: a graph copies its input to the host, the host computes on it between
    the two host nodes, the graph adds the result back; five replays with fresh inputs."""
    x = torch.zeros(4, 8, device="cuda")
    x_h, out_h = torch.empty(4, 8, pin_memory=True), torch.empty(4, 8, pin_memory=True)
    part = GraphCpuPart(lambda call: call.x * 3 + call.layer)
    ready, done = Semaphore(), Semaphore()
    call = HostCall(7, x_h, x_h, x_h, None, out_h, ready, done)
    from expertlora.host_nodes import launch_host

    side = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        stream = torch.cuda.current_stream()
        x_h.copy_(x, non_blocking=True)
        launch_host(stream, "post", ready)
        gpu = x * 2
        launch_host(stream, "wait", done)
        y = gpu + out_h.to("cuda", non_blocking=True)
    for i in range(5):
        fresh = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
        x.copy_(fresh)
        part.replay([call], graph)
        assert torch.allclose(y.cpu(), fresh * 5 + 7)


@cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_engine_hybrid_graph_decode_equals_eager(family, ratio, model_dir, fused_adapter):
    from expertlora.runtime import Engine, EngineConfig, SamplingParams

    math_dir, _, _ = fused_adapter(family)
    prompts = [torch.randint(0, 96, (4 + i,), generator=torch.Generator().manual_seed(90 + i)).tolist() for i in range(3)]
    adapters = [None, "math", "math"]
    s = SamplingParams(max_tokens=6, ignore_eos=True)
    results = {}
    for graphs in (False, True):
        config = EngineConfig(model_dir(family), method="bf16", adapters={"math": math_dir}, device="cuda", gpu_experts_ratio=ratio,
                              max_num_seqs=4, max_model_len=48, cuda_graphs=graphs)
        with Engine(config) as e:
            assert e.runner.graphs == graphs
            outs = e.generate(prompts, adapters, s)
            assert all(o.error is None for o in outs), outs[0].error
            results[graphs] = [o.token_ids for o in outs]
    assert results[True] == results[False]


@cuda
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_greedy_decode_hybrid_graph_equals_eager(ratio, model_dir, fused_adapter):
    from expertlora import load_adapter
    from expertlora.decode import greedy_decode
    from expertlora.integration import load_model
    from expertlora.placement import gpu_masks

    math_dir, _, base = fused_adapter("qwen3_moe")
    masks = gpu_masks(base.num_experts, base.moe_layers, round(ratio * base.num_experts), "prefix", None)
    lm = load_model(model_dir("qwen3_moe"), "bf16", adapters={"math": load_adapter(math_dir, base)}, device="cuda", gpu_masks=masks)
    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(3)).cuda()
    lm.use(["math", None])
    eager = greedy_decode(lm, ids, 8, graph=False)
    replayed = greedy_decode(lm, ids, 8, graph=True)
    assert torch.equal(eager, replayed)


@cuda
def test_cpu_failure_in_a_replayed_step_is_an_error(model_dir, monkeypatch):
    """The worker's hand-off (the kernel's host nodes: test_kernel_host_calls_in_a_replayed_layer)."""
    from expertlora.runtime import Engine, EngineConfig, SamplingParams

    monkeypatch.setenv("EXPERTLORA_GRAPH_HOST_CALLS", "worker")
    config = EngineConfig(model_dir("qwen3_moe"), method="bf16", device="cuda", gpu_experts_ratio=0.5, max_num_seqs=2, max_model_len=32)
    with Engine(config) as e:
        p = [1, 2, 3]
        e.generate([p], sampling=SamplingParams(max_tokens=4, ignore_eos=True))  # graphs captured
        cpu = e.lm.engine.cpu

        def broken(*args, **kwargs):  # fails in replayed steps only (the graph worker's thread)
            if threading.current_thread().name == "expertlora-graph-cpu-experts":
                raise RuntimeError("injected CPU failure")
            return saved(*args, **kwargs)

        saved = cpu.forward
        cpu.forward = broken
        try:
            out = e.generate([p], sampling=SamplingParams(max_tokens=4, ignore_eos=True))[0]
        finally:
            cpu.forward = saved
        assert out.finish_reason == "abort" and "injected CPU failure" in (out.error or "")
        assert e.generate([p], sampling=SamplingParams(max_tokens=4, ignore_eos=True))[0].finish_reason == "length"


# -- the host node runs the compiled kernel itself (KernelHostCalls) ----------------------------------

def _kernel_engine():
    from expertlora.engine import MoELoRAEngine
    from expertlora.experts import ExpertWeights
    from expertlora.kernels import KernelUnavailable, cpu_kernel
    from expertlora.tiny import random_expert_lora

    try:
        cpu_kernel()
    except KernelUnavailable as e:
        pytest.skip(f"the compiled kernel does not build here: {e}")
    E, H, I = 6, 64, 32
    g = torch.Generator().manual_seed(5)
    gate, up, down = (torch.randn(E, I, H, generator=g) / 8, torch.randn(E, I, H, generator=g) / 8, torch.randn(E, H, I, generator=g) / 6)
    engine = MoELoRAEngine({0: ExpertWeights.from_tensors(gate, up, down, method="bf16")}, threads=2, kernel="compiled")
    for name, seed in (("a", 1), ("b", 2)):
        engine.load_adapter(name, random_expert_lora(E, H, I, [0], {"gate": 4, "up": 2, "down": 8}, seed=seed))
    engine.adapters_changed()
    return engine


def _buffers(engine, T: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    E, H = engine.slots.shape[0], engine.layers[0].hidden_size
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[0, 0] = -1  # a pair another backend runs: skipped
    weights = torch.rand(T, k, generator=g) + 0.1
    slots = torch.tensor([(0, -1, 1)[t % 3] for t in range(T)])
    return x, ids, weights, slots, torch.randn(T, H, generator=g).bfloat16()  # the output buffer: stale values, never NaN


def test_kernel_host_call_is_the_engine_forward():
    """The record's host function, called as CUDA calls it (a C function pointer, no Python in
    between), writes the layer's forward into its output buffer: the same kernel, the same bits."""
    from expertlora.engine import KernelHostCall

    engine = _kernel_engine()
    x, ids, weights, slots, out = _buffers(engine, 7, 3, seed=3)
    call = engine.host_call(0, x, ids, weights, slots, out)
    HOST_FN(KernelHostCall.function())(call.address)
    assert call.take_error() == ""
    assert torch.equal(out, engine.forward(0, x, ids, weights, slots))
    x.copy_(torch.randn_like(x, dtype=torch.float32).bfloat16())  # new inputs in the same buffers: the next replay's
    call.run()
    assert torch.equal(out, engine.forward(0, x, ids, weights, slots))


def test_kernel_host_call_keeps_its_error_for_the_caller():
    engine = _kernel_engine()
    x, ids, weights, slots, out = _buffers(engine, 4, 2, seed=4)
    before = out.clone()
    call = engine.host_call(0, x, ids, weights, slots, out)
    slots[1] = 9  # no such adapter slot: the kernel refuses, the host function must not throw
    call.run()
    error = call.take_error()
    assert "token_slots: slot 9" in error and "Exception raised from" not in error, error
    assert call.take_error() == "" and torch.equal(out, before)
    slots[1] = -1
    call.run()
    assert call.take_error() == "" and torch.equal(out, engine.forward(0, x, ids, weights, slots))


def test_kernel_host_call_buffers_are_checked():
    engine = _kernel_engine()
    x, ids, weights, slots, out = _buffers(engine, 4, 2, seed=5)
    for bad in ((x.float(), ids, weights, slots, out), (x, ids.int(), weights, slots, out), (x, ids, weights[:, :1], slots, out),
                (x, ids, weights, slots[:2], out), (x, ids.t().contiguous().t(), weights, slots, out)):
        with pytest.raises(ValueError, match="host call buffers: expected contiguous"):
            engine.host_call(0, *bad)


def test_host_calls_follow_the_cpu_engine_unless_the_environment_says(monkeypatch):
    for value, engine_kernel, kernel in (("", "compiled", True), ("", "torch", False), ("", "kt", False), ("worker", "compiled", False),
                                         ("kernel", "compiled", True), (" kernel ", "compiled", True), ("worker", "kt", False)):
        monkeypatch.setenv("EXPERTLORA_GRAPH_HOST_CALLS", value)
        assert host_calls_in_kernel(engine_kernel) is kernel, (value, engine_kernel)
    monkeypatch.setenv("EXPERTLORA_GRAPH_HOST_CALLS", "kernel")
    with pytest.raises(ValueError, match="EXPERTLORA_GRAPH_HOST_CALLS=kernel needs the compiled CPU kernel .this engine's: torch."):
        host_calls_in_kernel("torch")
    monkeypatch.setenv("EXPERTLORA_GRAPH_HOST_CALLS", "python\n" * 20)
    with pytest.raises(ValueError, match="EXPERTLORA_GRAPH_HOST_CALLS: expected worker or kernel") as e:
        host_calls_in_kernel("compiled")
    assert len(str(e.value)) < 120


@cuda
@pytest.mark.parametrize("on_gpu", [0, 3])
def test_kernel_host_calls_in_a_replayed_layer(on_gpu, monkeypatch):
    """A hybrid layer captured with KernelHostCalls replays as its eager call computes (GPU
    experts on the forked stream or none), and a failure in the host node is raised after the
    step, the next replay working again."""
    from expertlora.hybrid import HybridMoE
    from expertlora.tiny import random_expert_lora

    monkeypatch.setenv("EXPERTLORA_GRAPH_HOST_CALLS", "kernel")
    E, H, I, k, T = 8, 64, 32, 2, 4
    g = torch.Generator().manual_seed(6)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) / 8, torch.randn(E, H, I, generator=g) / 6
    mask = torch.zeros(E, dtype=torch.bool)
    mask[:on_gpu] = True
    hybrid = HybridMoE.build([(0, gate_up, down)], {0: mask}, "bf16", device="cuda", threads=2)
    hybrid.load_adapter("a", random_expert_lora(E, H, I, [0], {"gate": 4, "up": 4, "down": 4}, seed=7))
    hybrid.adapters_changed()
    assert hybrid.graphs_ready() and isinstance(hybrid.graph_part, KernelHostCalls)
    x = torch.randn(T, H, generator=g).bfloat16().cuda()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).cuda()
    weights = (torch.rand(T, k, generator=g) + 0.1).cuda()
    slots = torch.tensor([0, -1, 0, 0]).cuda()
    eager = hybrid.forward(0, x, ids, weights, slots.cpu())
    part = hybrid.graph_part
    part.preparing = True
    hybrid.forward(0, x, ids, weights, slots)
    part.preparing = False
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        y = hybrid.forward(0, x, ids, weights, slots)
    calls = part.take_captured()
    assert len(calls) == 1
    part.replay(calls, graph)
    assert (y.float() - eager.float()).norm() <= 1e-2 * eager.float().norm()
    slots.fill_(5)  # no such slot
    with pytest.raises(RuntimeError, match="CPU experts failed in a replayed step: token_slots: slot 5"):
        part.replay(calls, graph)
    slots.fill_(0)
    part.replay(calls, graph)
    expected = hybrid.forward(0, x, ids, weights, slots.cpu())
    assert (y.float() - expected.float()).norm() <= 1e-2 * expected.float().norm()
