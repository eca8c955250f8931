"""Fused step backends (legw_fused::fused_step_) against the reference backend, the oracle of every backend."""

import functools

import pytest
import torch

import legw_fused
from _helpers import assert_close, assert_close_to_reference, require_backend
from legw_fused import LARS, LEGW, SGD, ops

FUSED = ["cpp", "triton"]
# Awkward sizes: empty, one element, odd, one past 2^16 (a chunk), and a large odd one.
SIZES = [(0,), (1,), (7,), (65537,), (278011,), (3, 5, 7)]
CONFIGS = [
    ("sgd", dict(momentum=0.0)),
    ("sgd", dict(momentum=0.9, weight_decay=1e-2)),
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=5e-3)),
    ("sgd", dict(momentum=0.8, dampening=0.3)),
    ("lars", dict(momentum=0.9, weight_decay=1e-4)),
    ("lars", dict(momentum=0.9, weight_decay=5e-4, trust_clip=True)),
    ("lars", dict(momentum=0.9, nesterov=True, trust_clip=True)),
    ("lars", dict(momentum=0.0, weight_decay=1e-3)),
    ("lars-off", dict(momentum=0.9, weight_decay=1e-3, trust_clip=True)),
]


def make(kind, params, lr, backend, cfg):
    if kind == "sgd":
        return SGD(params, lr=lr, backend=backend, **cfg)
    return LARS([{"params": params, "lars": kind == "lars"}], lr=lr, trust_coefficient=0.02, backend=backend, **cfg)


def twin_params(dtype, seed=0, sizes=SIZES, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype=dtype, device=device)) for s in sizes]
    return a, [torch.nn.Parameter(p.detach().clone()) for p in a]


def run_pair(kind, cfg, dtype, lr, backend, steps=12, sizes=SIZES, device="cpu"):
    """A fused backend and the reference from the same parameters and gradients, compared after every step."""
    a, b = twin_params(dtype, sizes=sizes, device=device)
    fused, ref = make(kind, a, lr, backend, cfg), make(kind, b, lr, "torch", cfg)
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        for pa, pb in zip(a, b):
            g = (torch.randn(pa.shape, generator=gen) * 0.5).to(dtype=dtype, device=device)
            pa.grad, pb.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
        for i, (pa, pb) in enumerate(zip(a, b)):
            where = f"step {t}, tensor {i} {tuple(pa.shape)}"
            assert_close_to_reference(pa.detach(), pb.detach(), dtype, msg=lambda m: f"{where} param: {m}")
            if cfg["momentum"]:
                assert_close_to_reference(fused.state[pa]["momentum_buffer"], ref.state[pb]["momentum_buffer"],
                                          dtype, msg=lambda m: f"{where} momentum_buffer: {m}")
    return fused


LRS = {"float-lr": 0.05, "legw-lr": LEGW(0.5, 32, 256, 0.125, 4, 3)}


def reference_cases():
    """Every config x dtype x LR kind for cpp. Triton on CPU runs in the interpreter (seconds per step at these
    sizes): every config in fp32 with both LR kinds, low precision on a subset; the 278011-element tensor has its
    own Triton case below."""
    for kind, cfg in CONFIGS:
        cid = f"{kind}-{'-'.join(f'{a}={v}' for a, v in cfg.items())}"
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for lr_id in LRS:
                yield pytest.param("cpp", dtype, kind, cfg, lr_id, SIZES, id=f"cpp-{dtype}-{cid}-{lr_id}")
                if dtype == torch.float32 or (lr_id == "legw-lr" and kind in ("sgd", "lars")
                                               and cfg.get("nesterov") and cfg.get("weight_decay")):
                    yield pytest.param("triton", dtype, kind, cfg, lr_id, SIZES[:4] + SIZES[5:],
                                       id=f"triton-{dtype}-{cid}-{lr_id}")


@pytest.mark.parametrize("backend,dtype,kind,cfg,lr_id,sizes", list(reference_cases()))
def test_matches_reference(backend, dtype, kind, cfg, lr_id, sizes):
    require_backend(backend)
    fused = run_pair(kind, cfg, dtype, LRS[lr_id], backend, steps=10, sizes=sizes)
    assert int(fused.state[fused.param_groups[0]["params"][0]]["step"]) == 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_large_odd_tensor(dtype):
    require_backend("triton")
    run_pair("lars", dict(momentum=0.9, weight_decay=5e-4, trust_clip=True), dtype, LRS["legw-lr"], "triton",
             steps=10, sizes=[(278011,), (5,)])


@pytest.mark.parametrize("backend", FUSED)
def test_many_tensors_in_one_call(backend):
    require_backend(backend)
    # More tensors than one CUDA launch's kernel-argument metadata holds, and one spanning several chunks.
    sizes = [(i % 13 + 1, 3) for i in range(400)] + [(0,), (70000,)]
    run_pair("lars", dict(momentum=0.9, weight_decay=1e-4, trust_clip=True), torch.float32, 0.1, backend,
             steps=3, sizes=sizes)


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_repeatable_whatever_the_thread_count(backend):
    require_backend(backend)
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 1):
            torch.set_num_threads(n_threads)
            a, _ = twin_params(torch.float32, sizes=[(300000,), (65537,), (5,)])
            opt = LARS(a, lr=LEGW(0.5, 32, 256, 0.125, 4, 3), momentum=0.9, weight_decay=1e-4, trust_clip=True,
                       backend=backend)
            gen = torch.Generator().manual_seed(2)
            for _ in range(5):
                for p in a:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            results.append([p.detach().clone() for p in a])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)


def _op_args(n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(7 * (i + 1), generator=g).to(dtype) for i in range(n)]
    grads = [torch.randn(p.shape, generator=g).to(dtype) for p in params]
    bufs = [torch.randn(p.shape, generator=g).to(dtype) for p in params]
    sched = LEGW(0.5, 32, 256, 0.125, 4, 3)
    # The schema's order (csrc/legw_fused.cpp): ..., nesterov, maximize, first_step, lars, trust_coefficient, eps,
    # trust_clip, max_trust_ratio, grad_scale, found_inf, norms_sq, param_sq, param_sq_cached, advance_step.
    return (params, grads, bufs, [], torch.tensor(5), sched.packed("cpu"), None, 0.0, 0.9, 0.0, 1e-4, False, False,
            False, True, 0.02, 1e-8, True, float("inf"), None, None, None, None, False, False)


# Position of each argument of fused_step_, by name, from its schema.
ARG = {a.name: i for i, a in enumerate(torch.ops.legw_fused.fused_step_.default._schema.arguments)} \
    if ops.EXTENSION_ERROR is None else {}

# The ops behind each fused backend: (fused step, sum of squares).
OPS = {"cpp": ("fused_step_", "sum_squares"), "triton": ("fused_step_triton_", "sum_squares_triton")}


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    require_backend(backend)
    step_op, sum_op = (getattr(torch.ops.legw_fused, name).default for name in OPS[backend])
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(step_op, _op_args(dtype=dtype))
        # With given norms, and with the |p|^2 cache written (then read).
        args = list(_op_args(dtype=dtype))
        args[ARG["norms_sq"]] = torch.rand(2, 3)
        torch.library.opcheck(step_op, tuple(args))
        args = list(_op_args(dtype=dtype))
        args[ARG["param_sq"]] = torch.zeros(3)
        torch.library.opcheck(step_op, tuple(args))
        args[ARG["param_sq_cached"]] = True
        torch.library.opcheck(step_op, tuple(args))
        params, grads = _op_args(dtype=dtype)[:2]
        for cached in (None, torch.rand(3)):
            torch.library.opcheck(sum_op, (params, grads, [], cached, torch.tensor(4.0)))


@pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
def test_triton_ops_have_the_schemas_of_the_cpp_ops():
    for cpp_name, triton_name in zip(*OPS.values()):
        cpp = str(getattr(torch.ops.legw_fused, cpp_name).default._schema)
        triton = str(getattr(torch.ops.legw_fused, triton_name).default._schema)
        assert triton == cpp.replace(cpp_name, triton_name, 1)


@pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
def test_op_rejects_inconsistent_arguments():
    op = torch.ops.legw_fused.fused_step_
    args = list(_op_args())
    bad = list(args)
    bad[1] = args[1][:2]
    with pytest.raises(RuntimeError, match="3 params but 2 grads"):
        op(*bad)
    bad = list(args)
    bad[1] = [args[1][0].double()] + args[1][1:]
    with pytest.raises(RuntimeError, match="grad 0 must be a contiguous Float tensor of 7 elements"):
        op(*bad)
    bad = list(args)
    bad[0] = [torch.randn(7, 2).t()] + args[0][1:]
    with pytest.raises(RuntimeError, match="param 0 is not contiguous"):
        op(*bad)
    bad = list(args)
    bad[2] = []
    with pytest.raises(RuntimeError, match="momentum_buffers must hold one tensor per param"):
        op(*bad)
    bad = list(args)
    bad[4] = torch.tensor(5.0)
    with pytest.raises(RuntimeError, match="step must be a one-element int64"):
        op(*bad)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_advance_step_counts_once_after_the_update_and_never_a_skipped_step(backend):
    """advance_step: the call reads the step count for its LR, then adds one, also when it makes two op calls (some
    buffers new, some not) and when it has no tensor; a GradScaler-skipped call adds none; without it the count
    is only read. Oracle: the same call without advance_step on the same inputs, and the count by hand."""
    require_backend(backend)
    b = legw_fused.backends.STEP_BACKENDS[backend]
    sched = LEGW(0.5, 32, 256, 0.125, 4, 3)

    def call(advance, found_inf=None, sizes=((7,), (65537,)), old_buffer=False):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen) for s in sizes]
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        bufs = [None] * len(params)
        if old_buffer:
            bufs[-1] = torch.randn(params[-1].shape, generator=gen)
        step = torch.tensor(3)
        kw = {} if found_inf is None else dict(found_inf=found_inf)  # the reference is only called for finite steps
        bufs = b.step_(params, grads, bufs, lr=sched, step=step, momentum=0.9, dampening=0.0, weight_decay=1e-4,
                       nesterov=False, advance_step=advance, **kw)
        return params + bufs, step

    for old_buffer in (False, True):
        kept, counted = call(False, old_buffer=old_buffer), call(True, old_buffer=old_buffer)
        assert (int(kept[1]), int(counted[1])) == (3, 4)
        for x, y in zip(kept[0], counted[0]):  # the update used the LR of step 3 either way
            assert torch.equal(x, y)
    assert int(call(True, sizes=())[1]) == 4
    if backend != "torch":
        before, _ = call(False, found_inf=torch.ones(()))
        skipped, step = call(True, found_inf=torch.ones(()))
        assert int(step) == 3
        for x, y in zip(before, skipped):
            assert torch.equal(x, y)
        assert int(call(True, found_inf=torch.zeros(()))[1]) == 4


@pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
def test_unboxed_entry_is_the_op_and_declines_what_torch_ops_would_convert():
    """_C.fused_step_unboxed (the optimizer's way in) against torch.ops.legw_fused.fused_step_: the same writes and
    version bumps, the same errors; NotImplemented, changing nothing, for whatever it does not take as it is."""
    unboxed, op = ops._C.fused_step_unboxed, torch.ops.legw_fused.fused_step_
    for advance in (False, True):
        theirs, ours = list(_op_args()), list(_op_args())
        theirs[ARG["advance_step"]] = ours[ARG["advance_step"]] = advance
        op(*theirs)
        assert unboxed(*ours) is None
        for name in ("params", "momentum_buffers", "step"):
            t, o = theirs[ARG[name]], ours[ARG[name]]
            for x, y in zip(*((t, o) if isinstance(t, list) else ([t], [o]))):
                assert torch.equal(x, y) and x._version == y._version > 0

    class Sub(torch.Tensor):
        pass

    args = list(_op_args())
    before = [p.clone() for p in args[0]]
    declined = {"24 arguments": args[:-1], "a bool as a float": args[:7] + [True] + args[8:],
                "an int as a bool": args[:11] + [1] + args[12:],
                "a tensor subclass": [[args[0][0].as_subclass(Sub)] + args[0][1:]] + args[1:],
                "a tuple for a list": [tuple(args[0])] + args[1:]}
    for what, bad in declined.items():
        assert unboxed(*bad) is NotImplemented, what
        assert all(torch.equal(p, q) for p, q in zip(args[0], before)), what
    bad = list(args)
    bad[1] = args[1][:2]
    errors = []
    for entry in (op, unboxed):
        with pytest.raises(RuntimeError, match="3 params but 2 grads") as info:
            entry(*bad)
        errors.append(str(info.value).splitlines()[0])
    assert errors[0] == errors[1]


def test_auto_uses_a_fused_backend_on_cpu_and_the_reference_for_what_it_cannot():
    info = legw_fused.backend_info()
    if not info["cpp"]["available"]:
        pytest.skip(f"cpp backend unavailable: {info['cpp']['reason']}")
    assert info["auto"]["cpu"] == "cpp"
    select = functools.partial(legw_fused.backends.select, legw_fused.backends.STEP_BACKENDS)
    assert select("auto", torch.device("cpu"), torch.float32).name == "cpp"
    assert select("auto", torch.device("cpu"), torch.float64).name == "torch"
    assert select("auto", torch.device("cpu"), torch.float32, contiguous=False).name == "torch"
    with pytest.raises(RuntimeError, match="supports float32, bfloat16, float16 tensors, not torch.float64"):
        SGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], lr=0.1, backend="cpp")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["sgd", "lars"])
def test_master_weights_follow_an_fp32_run(backend, dtype, kind):
    """With master_weights, bf16/fp16 params are the rounding of an fp32 master that evolves exactly as fp32
    params would with the same (low-precision) gradients; momentum is fp32 too."""
    cfg = dict(momentum=0.9, weight_decay=1e-3, nesterov=True)
    low, _ = twin_params(dtype, sizes=[(7,), (65537,), (3, 5)])
    full = [torch.nn.Parameter(p.detach().float()) for p in low]
    lr = LRS["legw-lr"]
    opt = make(kind, low, lr, backend, cfg)
    for group in opt.param_groups:
        group["master_weights"] = True
    ref = make(kind, full, lr, "torch", cfg)
    gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        for p, q in zip(low, full):
            g = (torch.randn(p.shape, generator=gen) * 0.5).to(dtype)
            p.grad, q.grad = g, g.float()
        opt.step()
        ref.step()
    # The reference is bitwise the fp32 run; fused kernels within the fp32 error model (seen: 2 ulps at |x| = 29).
    close = (lambda x, y: assert_close(x, y, "exact")) if backend == "torch" else \
        (lambda x, y: assert_close_to_reference(x, y, torch.float32))
    for p, q in zip(low, full):
        state = opt.state[p]
        assert state["master_param"].dtype == torch.float32 and state["momentum_buffer"].dtype == torch.float32
        close(state["master_param"], q.detach())
        close(state["momentum_buffer"], ref.state[q]["momentum_buffer"])
        assert torch.equal(p.detach(), state["master_param"].to(dtype))


def test_master_weights_survive_state_dict_and_start_mid_training(backend):
    import io

    low, twin = twin_params(torch.bfloat16, sizes=[(9,), (4, 4)])
    a = SGD(low, lr=0.1, momentum=0.9, backend=backend)
    gen = torch.Generator().manual_seed(5)

    def grads():
        gs = [(torch.randn(p.shape, generator=gen)).bfloat16() for p in low]
        for p, q, g in zip(low, twin, gs):
            p.grad, q.grad = g.clone(), g.clone()

    grads()
    a.step()  # plain bf16 step: bf16 momentum
    a.param_groups[0]["master_weights"] = True  # switched on: masters from the params, momentum made fp32
    grads()
    a.step()
    assert a.state[low[0]]["momentum_buffer"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = SGD(twin, lr=0.1, momentum=0.9, backend=backend, master_weights=True)
    with torch.no_grad():
        for p, q in zip(low, twin):
            q.copy_(p)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for q in twin:
        assert b.state[q]["master_param"].dtype == torch.float32  # not cast to bf16 by torch's loader
        assert b.state[q]["momentum_buffer"].dtype == torch.float32
    for _ in range(3):
        grads()
        a.step()
        b.step()
    for p, q in zip(low, twin):
        assert torch.equal(p, q)
        assert torch.equal(a.state[p]["master_param"], b.state[q]["master_param"])


def test_master_weights_switched_off_continue_from_the_params(backend):
    """Switching master_weights off mid-training: every bucket steps (none is left half-done by a dtype error),
    the masters go, momentum returns to the params' dtype, and the run continues as torch.optim.SGD would from
    those params and that momentum."""
    low, twin = twin_params(torch.bfloat16, sizes=[(9,), (4, 4), (65537,)])
    f32 = torch.nn.Parameter(torch.randn(5))  # a second bucket, stepped before or after the bf16 one
    a = SGD([f32] + low, lr=0.1, momentum=0.9, master_weights=True, backend=backend)
    gen = torch.Generator().manual_seed(8)
    for _ in range(2):
        for p in [f32] + low:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        a.step()
    a.param_groups[0]["master_weights"] = False
    theirs = torch.optim.SGD(twin, lr=0.1, momentum=0.9)
    with torch.no_grad():
        for p, q in zip(low, twin):
            q.copy_(p)
            theirs.state[q]["momentum_buffer"] = a.state[p]["momentum_buffer"].to(torch.bfloat16)
    before = f32.detach().clone()
    for _ in range(3):
        for p, q in zip(low, twin):
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            q.grad = p.grad.clone()
        f32.grad = torch.randn(5, generator=gen)
        a.step()
        theirs.step()
    assert not torch.equal(f32.detach(), before)
    assert int(a.state[f32]["step"]) == 5
    for p, q in zip(low, twin):
        assert "master_param" not in a.state[p] and a.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert_close_to_reference(p.detach(), q.detach(), torch.bfloat16)
        assert_close_to_reference(a.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"],
                                  torch.bfloat16)


def test_master_weights_follow_a_param_changed_outside_the_optimizer(backend):
    """A bf16 param changed between steps (the model's load_state_dict copies under no_grad) must not be undone
    by its stale fp32 master at the next step: the master is made again from it."""
    low, _ = twin_params(torch.bfloat16, sizes=[(9,), (65537,)])
    a = SGD(low, lr=0.1, momentum=0.9, master_weights=True, backend=backend)
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        for p in low:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        a.step()
    loaded = [torch.randn(p.shape, generator=gen).bfloat16() for p in low]
    with torch.no_grad():
        for p, x in zip(low, loaded):
            p.copy_(x)
    expected = []
    for p, x in zip(low, loaded):
        p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        buf = a.state[p]["momentum_buffer"] * 0.9 + p.grad.float()
        expected.append(x.float() - 0.1 * buf)  # SGD's update of the loaded value, in fp32
    a.step()
    for p, want in zip(low, expected):
        assert_close_to_reference(a.state[p]["master_param"], want, torch.float32)
        assert torch.equal(p.detach(), a.state[p]["master_param"].bfloat16())


def _compiled_vs_eager(kind, backend, compiler, sizes=((8, 4), (4,), (65537,))):
    """Steps a compiled (fullgraph) and an eager optimizer through a whole LEGW schedule on the same grads; returns
    the number of frames compiled."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    sched = LRS["legw-lr"]
    cfg = dict(momentum=0.9, weight_decay=1e-4, trust_clip=True) if kind == "lars" else dict(momentum=0.9)
    compiled_params, eager_params = twin_params(torch.float32, sizes=list(sizes))
    compiled, eager = make(kind, compiled_params, sched, backend, cfg), make(kind, eager_params, sched, backend, cfg)
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler)

    @torch.compile(backend=counter, fullgraph=True)
    def compiled_step():
        compiled.step()

    gen = torch.Generator().manual_seed(6)
    for _ in range(sched.total_steps):
        for p, q in zip(compiled_params, eager_params):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        compiled_step()
        eager.step()
    for p, q in zip(compiled_params, eager_params):
        assert_close(p, q, "fused")
    assert int(compiled.state[compiled_params[0]]["step"]) == sched.total_steps
    return counter.frame_count


@pytest.mark.parametrize("kind", ["sgd", "lars"])
def test_compiled_step_fullgraph_does_not_recompile_as_the_lr_changes(backend, kind):
    # aot_eager functionalizes the graph (the ops' in-place writes go through their schemas' alias annotations)
    # without inductor's compile time. One graph for the first step (state is created), one for every later step,
    # whatever the LR.
    assert _compiled_vs_eager(kind, backend, "aot_eager") == 2


@pytest.mark.parametrize("backend", FUSED)
def test_inductor_compiled_lars_step_matches_eager(backend):
    require_backend(backend)
    assert _compiled_vs_eager("lars", backend, "inductor", sizes=((8, 4), (4,))) == 2


@pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
def test_op_rejects_bad_scalar_tensors():
    op = torch.ops.legw_fused.fused_step_
    args = list(_op_args())
    bad = list(args)
    bad[5] = args[5][:4]
    with pytest.raises(RuntimeError, match="schedule must be the contiguous 1-D float64"):
        op(*bad)
    for name in ("lr_tensor", "grad_scale", "found_inf"):
        bad = list(args)
        bad[ARG[name]] = torch.ones(2)
        with pytest.raises(RuntimeError, match=f"{name} must be a one-element tensor"):
            op(*bad)


def test_triton_launcher_checks_its_lists():
    require_backend("triton")
    from legw_fused.kernels import fused_step as triton_step

    params, grads, bufs, *rest = _op_args(dtype=torch.bfloat16)
    masters = [p.float() for p in params]
    with pytest.raises(ValueError, match="momentum buffer 0 must be a contiguous torch.float32 tensor"):
        triton_step.fused_step_(params, grads, bufs, masters, *rest[1:])  # bf16 buffers with fp32 masters
    args = list(_op_args())
    args[5] = args[5].to("meta")
    with pytest.raises(ValueError, match="schedule is on meta"):
        triton_step.fused_step_(*args)


def test_triton_tables_are_built_once_for_many_buckets(monkeypatch):
    require_backend("triton")
    from legw_fused.kernels import fused_step as triton_step

    built = []

    class Counting(triton_step._Tables):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(triton_step, "_Tables", Counting)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3))]} for _ in range(20)]  # 20 buckets
    opt = SGD(groups, lr=0.1, momentum=0.9, backend="triton")
    for g in groups:
        g["params"][0].grad = torch.ones(3)  # the same gradient tensors every step, as under a captured graph
    for step in range(3):
        opt.step()
        if step == 1:
            after_warm_up = len(built)
    assert len(built) == after_warm_up  # the third step reuses every table
