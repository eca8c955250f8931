"""legw_fused.SGD / LARS under torch.distributed (gloo, CPU, 2 processes spawned from pytest): FSDP2 with uneven and
empty shards, DDP, a group mixing sharded, replicated and plain params, one all-reduce per LARS step, DCP
checkpoints (save -> load -> continue, and 2 ranks -> 1 process). The oracle is a single-process run on the same
global batch (the torch reference backend for the trust ratios).

All scenarios run in one pair of spawned processes (starting them costs seconds); each test reads its scenario's
outcome.
"""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import legw_fused
from _helpers import assert_close
from legw_fused import LARS, LEGW, SGD
from legw_fused.ops import fused_step_reference as reference

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD = 2
STEPS = 10
SCHED = dict(base_lr=0.3, base_batch_size=4, batch_size=8, base_warmup_epochs=0.25, steps_per_epoch=4, epochs=3)
LARS_CFG = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, trust_clip=True)
SCENARIOS = ["fsdp_sgd", "fsdp_lars", "ddp_sgd", "ddp_lars", "mixed_sgd", "mixed_lars", "dcp", "bad_placement"]


def _model():
    # 33 output rows: shards of 17 and 16 rows; the last layer's [1, 33] weight and [1] bias leave rank 1 empty.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 1))


def _batch(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)


def _optimizer(kind, model_or_params, backend="auto"):
    if kind == "sgd":
        params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
        return SGD(params, lr=LEGW(**SCHED), momentum=0.9, weight_decay=1e-3, backend=backend)
    groups = legw_fused.param_groups(model_or_params, weight_decay=1e-3)  # biases: lars=False, wd 0
    return LARS(groups, lr=LEGW(**SCHED), backend=backend, **{k: v for k, v in LARS_CFG.items()
                                                                if k != "weight_decay"})


class _Spy:
    """Counts all-reduces issued inside optimizer.step() and records the LARS norms each step used."""

    def __init__(self):
        self.all_reduces = []
        self.norms = []
        self._in_step = False

    def install(self, monkeypatch_like):
        spy = self
        real_all_reduce = dist.all_reduce

        def counting_all_reduce(*args, **kwargs):
            if spy._in_step:
                spy.all_reduces[-1] += 1
            return real_all_reduce(*args, **kwargs)

        monkeypatch_like.append((dist, "all_reduce", real_all_reduce))
        dist.all_reduce = counting_all_reduce
        real = legw_fused.optim._MomentumOptimizer._all_reduce_norms

        def recording(opt, buckets):
            real(opt, buckets)
            if not spy._in_step:
                return
            spy.norms[-1] += [(b.params, b.norms_sq.clone(), {**b.kwargs, "lr": _lr_at(b.kwargs)}) for b in buckets]

        monkeypatch_like.append((legw_fused.optim._MomentumOptimizer, "_all_reduce_norms", real))
        legw_fused.optim._MomentumOptimizer._all_reduce_norms = recording

    def step(self, opt):
        self.all_reduces.append(0)
        self.norms.append([])
        self._in_step = True
        try:
            opt.step()
        finally:
            self._in_step = False


def _single_process_run(kind, steps=STEPS):
    """The oracle: one process, the whole batch; per step the trust ratios of every LARS tensor by the reference."""
    model = _model()
    opt = _optimizer(kind, model, backend="torch")
    ratios = []
    for t in range(steps):
        x, y = _batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step_ratios = {}
        for group in opt.param_groups:
            if kind == "lars" and group["lars"]:
                params = group["params"]
                r = reference.trust_ratios(params, [p.grad for p in params], lr=opt.current_lrs()[0],
                                           weight_decay=group["weight_decay"],
                                           trust_coefficient=group["trust_coefficient"], eps=group["eps"],
                                           trust_clip=group["trust_clip"])
                step_ratios.update({id(p): v for p, v in zip(params, r)})
        names = {id(p): n for n, p in model.named_parameters()}
        ratios.append({names[k]: v.detach() for k, v in step_ratios.items()})
        opt.step()
    return model, ratios


def _recorded_ratios(spy_norms, model):
    """Trust ratios recomputed from the norms the distributed step used, by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for params, norms_sq, kwargs in spy_norms:
        r = reference.trust_ratios([torch.zeros(1)] * len(params), [torch.zeros(1)] * len(params),
                                   lr=kwargs["lr"], weight_decay=kwargs["weight_decay"],
                                   trust_coefficient=kwargs["trust_coefficient"], eps=kwargs["eps"],
                                   trust_clip=kwargs["trust_clip"], norms_sq=norms_sq.double())
        out.update({names[id(p)]: v for p, v in zip(params, r)})
    return out


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train_distributed(kind, model, rank, spy, steps=STEPS, opt=None, start=0):
    opt = opt or _optimizer(kind, model)
    for t in range(start, start + steps):
        x, y = _batch(t)
        part = slice(rank * 4, rank * 4 + 4)  # this rank's half of the global batch of 8
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
        if spy is not None:
            spy.step(opt)
        else:
            opt.step()
    return opt


def _check_against_single_process(kind, model, spy, rank):
    single, ratios = _single_process_run(kind)
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    for (name, p), (_, q) in zip(inner.named_parameters(), single.named_parameters()):
        assert_close(_full(p.detach()), q.detach(), "distributed", msg=lambda m: f"rank {rank} {name}: {m}")
    expected_reduces = 1 if kind == "lars" and not isinstance(model, torch.nn.parallel.DistributedDataParallel) \
        else 0
    assert spy.all_reduces == [expected_reduces] * STEPS, spy.all_reduces
    if kind == "lars" and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        # DDP: whole params, all-reduced grads: the optimizer's plain path, no norm exchange; the trust ratios are
        # the single-process ones because the params above are.
        assert spy.norms == [[]] * STEPS
    elif kind == "lars":
        for t in range(STEPS):
            got = _recorded_ratios(spy.norms[t], inner)
            assert set(got) == set(ratios[t]) == {"0.weight", "2.weight"}, (set(got), set(ratios[t]))
            for name, want in ratios[t].items():
                assert_close(got[name].float(), want.float(), "distributed_ratio",
                                           msg=lambda m: f"step {t} trust ratio of {name}: {m}")
            assert any(abs(float(v) - 1.0) > 1e-3 for v in ratios[t].values()), "ratios must not all be 1"
            assert any(float(v) < 1.0 for v in got.values()), "trust_clip must not clip every ratio to 1"


def _scenario_fsdp(kind, rank, mesh, spy):
    model = _fsdp_model(mesh)
    local_rows = model[2].weight.to_local().shape[0]
    assert local_rows == (1 if rank == 0 else 0)  # rank 1 holds an empty shard of the [1, 33] weight
    assert model[0].weight.to_local().shape[0] == (17 if rank == 0 else 16)
    _train_distributed(kind, model, rank, spy)
    _check_against_single_process(kind, model, spy, rank)


def _scenario_ddp(kind, rank, spy):
    model = torch.nn.parallel.DistributedDataParallel(_model())
    _train_distributed(kind, model, rank, spy)
    _check_against_single_process(kind, model, spy, rank)


def _scenario_mixed(kind, rank, mesh, spy):
    """One param group of a [33, 4] and a [1, 5] weight sharded over dim 0 (uneven; rank 1's second shard is
    empty), a [6] vector replicated as a DTensor, and a plain [3, 3] tensor, with identical full gradients."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(7)
    shapes = [(33, 4), (1, 5), (6,), (3, 3)]
    full = [torch.randn(s, generator=gen) for s in shapes]
    layouts = [[Shard(0)], [Shard(0)], [Replicate()], None]
    dist_params = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, pl) if pl else t.clone())
                   for t, pl in zip(full, layouts)]
    single = [torch.nn.Parameter(t.clone()) for t in full]
    cfg = dict(lr=LEGW(**SCHED), momentum=0.9, weight_decay=1e-3)
    if kind == "sgd":
        ours, ref = SGD(dist_params, **cfg), SGD(single, backend="torch", **cfg)
    else:
        extra = dict(trust_coefficient=0.02, trust_clip=True)
        ours = LARS([{"params": dist_params[:3] + dist_params[3:]}], **cfg, **extra)
        ref = LARS([{"params": single}], backend="torch", **cfg, **extra)
    for t in range(STEPS):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g, pl in zip(dist_params, single, grads, layouts):
            p.grad = distribute_tensor(g.clone(), mesh, pl) if pl else g.clone()
            q.grad = g.clone()
        if kind == "lars":
            want = reference.trust_ratios(single, grads, lr=ref.current_lrs()[0], weight_decay=1e-3,
                                          trust_coefficient=0.02, eps=ref.param_groups[0]["eps"], trust_clip=True)
        spy.step(ours)
        ref.step()
        if kind == "lars":
            (params, norms_sq, kwargs), = spy.norms[-1]
            got = reference.trust_ratios(single, grads, lr=kwargs["lr"], weight_decay=1e-3, trust_coefficient=0.02,
                                         eps=ref.param_groups[0]["eps"], trust_clip=True,
                                         norms_sq=norms_sq.double())
            assert_close(got, want, "distributed_ratio", msg=lambda m: f"step {t} ratios: {m}")
    for p, q in zip(dist_params, single):
        assert_close(_full(p.detach()), q.detach(), "distributed")
    assert spy.all_reduces == [1 if kind == "lars" else 0] * STEPS, spy.all_reduces


def _lr_at(kwargs):
    """The step's LR, evaluated now (the step counter advances after the step)."""
    lr = kwargs["lr"]
    return lr.lr_tensor(kwargs["step"]).clone() if isinstance(lr, LEGW) else lr


def _scenario_dcp(rank, mesh, out_dir):
    """FSDP2 + LARS (LEGW lr, momentum, trust_clip): 5 steps, DCP save, a fresh model and optimizer load it and
    continue 5 steps; equals 10 uninterrupted steps. The checkpoint stays for the 2 -> 1 test in the parent."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    straight = _fsdp_model(mesh)
    _train_distributed("lars", straight, rank, None, steps=10)

    first = _fsdp_model(mesh)
    opt = _train_distributed("lars", first, rank, None, steps=5)
    model_sd, optim_sd = get_state_dict(first, opt)
    ckpt = os.path.join(out_dir, "dcp")
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    # For the parent's 2 -> 1 check (full_tensor is a collective: both ranks gather, rank 0 writes).
    gathered = {"after_5": {n: _full(p.detach()) for n, p in first.named_parameters()},
                "after_10": {n: _full(p.detach()) for n, p in straight.named_parameters()}}
    if rank == 0:
        torch.save(gathered, os.path.join(out_dir, "dcp_reference.pt"))

    resumed = _fsdp_model(mesh)
    with torch.no_grad():  # a different starting point, so that loading must overwrite everything
        for p in resumed.parameters():
            p.mul_(0.5)
    opt2 = _optimizer("lars", resumed)
    model_sd2, optim_sd2 = get_state_dict(resumed, opt2)
    state = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(resumed, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert isinstance(opt2.param_groups[0]["lr"], LEGW)
    assert int(opt2.state[next(iter(resumed.parameters()))]["step"]) == 5
    _train_distributed("lars", resumed, rank, None, steps=5, opt=opt2, start=5)
    for (name, p), (_, q) in zip(resumed.named_parameters(), straight.named_parameters()):
        assert_close(_full(p.detach()), _full(q.detach()), "distributed", msg=lambda m: f"{name}: {m}")


def _scenario_bad_placement(mesh):
    """A Partial (pending-sum) parameter has no norm LARS can take: a clear error, nothing changed."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    good = torch.nn.Parameter(DTensor.from_local(torch.ones(3, 2), mesh, [Shard(0)]))
    bad = torch.nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Partial()]))
    for p in (good, bad):
        p.grad = DTensor.from_local(torch.ones_like(p.to_local()), mesh, p.placements)
    opt = LARS([good, bad], lr=0.1)
    try:
        opt.step()
    except ValueError as exc:
        assert "Partial placement" in str(exc) and "Shard" in str(exc), exc
    else:
        raise AssertionError("a Partial parameter must raise")
    assert torch.equal(good.to_local(), torch.ones(3, 2)) and not opt.state


def _worker(rank, port, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name in SCENARIOS:
        patches = []
        spy = _Spy()
        spy.install(patches)
        try:
            kind = name.split("_")[-1]
            if name.startswith("fsdp"):
                _scenario_fsdp(kind, rank, mesh, spy)
            elif name.startswith("ddp"):
                _scenario_ddp(kind, rank, spy)
            elif name.startswith("mixed"):
                _scenario_mixed(kind, rank, mesh, spy)
            elif name == "bad_placement":
                _scenario_bad_placement(mesh)
            else:
                _scenario_dcp(rank, mesh, out_dir)
            results[name] = "ok"
        except Exception:  # reported by the test of this scenario, with the traceback
            results[name] = traceback.format_exc()
        finally:
            for owner, attr, value in reversed(patches):
                setattr(owner, attr, value)
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"results_{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("distributed"))
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    return out_dir, [torch.load(os.path.join(out_dir, f"results_{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario(outcomes, scenario):
    _, results = outcomes
    for rank, res in enumerate(results):
        assert res[scenario] == "ok", f"rank {rank}:\n{res[scenario]}"


def test_dcp_checkpoint_of_two_ranks_resumes_in_one_process(outcomes):
    """2 -> 1: the FSDP2 checkpoint loads into a plain (unsharded) model and optimizer in one process, and the
    next 5 steps equal the 2-rank uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out_dir, results = outcomes
    assert all(r["dcp"] == "ok" for r in results)
    expected = torch.load(os.path.join(out_dir, "dcp_reference.pt"))
    model = _model()
    opt = _optimizer("lars", model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for name, p in model.named_parameters():
        assert_close(p.detach(), expected["after_5"][name], "exact")
    assert int(opt.state[model[0].weight]["step"]) == 5
    for t in range(5, 10):
        x, y = _batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert_close(p.detach(), expected["after_10"][name], "distributed", msg=lambda m: f"{name}: {m}")


def test_global_batch_size_helper():
    assert legw_fused.distributed.global_batch_size(64) == 64  # not initialized here: one process
    with pytest.raises(ValueError, match="per_rank_batch must be an int > 0"):
        legw_fused.distributed.global_batch_size(0)
