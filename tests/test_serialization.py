"""Checkpoints: torch.load(weights_only=True) of whole legw_fused modules and of anything holding a LEGW, and a
resume from a checkpoint that continues bit for bit like the uninterrupted run (also in another process)."""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import legw_fused
from _helpers import require_backend
from legw_fused import LARS, LEGW, SGD

SCHED = LEGW(0.1, 32, 128, 0.5, 4, 6)  # W = 8, T = 24: a resume at step 5 lands in the warmup, the end in the decay
TESTS = os.path.dirname(os.path.abspath(__file__))


class Net(torch.nn.Module):
    """A user's model holding both legw_fused modules; x: [B, T, 4] -> [B, 3]."""

    def __init__(self):
        super().__init__()
        self.lstm = legw_fused.LSTM(4, 6, batch_first=True)
        self.cell = legw_fused.LSTMCell(6, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        h, _ = self.cell(y[:, -1])
        return self.head(h)


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (tests/ importable, this process's environment); return its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_whole_modules_and_legw_load_with_weights_only(tmp_path):
    torch.manual_seed(0)
    net = Net()
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = SGD(params, lr=SCHED, momentum=0.9)
    scheduler = legw_fused.LEGWScheduler(torch.optim.SGD([torch.nn.Parameter(torch.randn(2))], lr=1.0), SCHED)
    torch.save(net, tmp_path / "net.pt")
    torch.save(net.lstm, tmp_path / "lstm.pt")
    torch.save({"schedule": SCHED, "schedules": [SCHED], "opt": opt.state_dict(), "sched": scheduler.state_dict()},
               tmp_path / "ckpt.pt")
    x = torch.randn(2, 5, 4)
    torch.save(x, tmp_path / "x.pt")
    # In a fresh process: nothing is allowed before legw_fused is imported, and all of it after (its import
    # registers the classes); the user's own model class and torch's modules in it (Linear) are theirs to allow,
    # as for any model.
    out = _python(f"""
        import torch, pickle
        try:
            torch.load({str(tmp_path / "lstm.pt")!r}, weights_only=True)
            print("loaded-before-import")
        except pickle.UnpicklingError:
            print("refused-before-import")
        import legw_fused
        from test_serialization import Net
        lstm = torch.load({str(tmp_path / "lstm.pt")!r}, weights_only=True)
        with torch.serialization.safe_globals([Net, torch.nn.Linear]):
            net = torch.load({str(tmp_path / "net.pt")!r}, weights_only=True)
        ckpt = torch.load({str(tmp_path / "ckpt.pt")!r}, weights_only=True)
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        assert type(lstm) is legw_fused.LSTM and type(net.cell) is legw_fused.LSTMCell
        assert ckpt["schedule"] == ckpt["schedules"][0] and ckpt["schedule"].lr(9) == {SCHED.lr(9)!r}
        torch.save({{"net": net(x), "lstm": lstm(x)[0]}}, {str(tmp_path / "out.pt")!r})
        print("ok")
    """)
    assert out.split() == ["refused-before-import", "ok"]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(got["net"], net(x)) and torch.equal(got["lstm"], net.lstm(x)[0])


def test_weights_only_load_in_this_process_continues_the_schedule():
    buf = io.BytesIO()
    torch.save({"schedule": SCHED, "model": legw_fused.LSTMCell(3, 2)}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["schedule"] == SCHED and [loaded["schedule"](t) for t in range(30)] == [SCHED(t) for t in range(30)]
    assert isinstance(loaded["model"], legw_fused.LSTMCell)


# ------------------------------------------------------------------------------------------------ resume

STEPS, RESUME_AT = 14, 5


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _optimizer(kind, model, backend):
    if kind == "sgd":
        return SGD(model.parameters(), lr=SCHED, momentum=0.9, nesterov=True, weight_decay=1e-3, backend=backend)
    return LARS(legw_fused.param_groups(model, weight_decay=1e-3), lr=SCHED, momentum=0.9, trust_coefficient=0.02,
                trust_clip=True, backend=backend)  # cache_norms=True: the default


def _train(model, opt, steps):
    for t in steps:
        gen = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _resumed(kind, backend, path):
    """A new model and optimizer from the checkpoint at ``path``, trained to the end; their parameters."""
    model = _model()
    opt = _optimizer(kind, model, backend)
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    _train(model, opt, range(RESUME_AT, STEPS))
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("kind,backend", [pytest.param(k, b, id=f"{k}-{b}") for k in ("sgd", "lars")
                                          for b in ("torch", "cpp", "triton")])
def test_resume_from_checkpoint_is_bitwise_the_uninterrupted_run(kind, backend, tmp_path):
    require_backend(backend)
    model = _model()
    opt = _optimizer(kind, model, backend)
    _train(model, opt, range(RESUME_AT))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    _train(model, opt, range(RESUME_AT, STEPS))
    uninterrupted = [p.detach() for p in model.parameters()]
    assert int(opt.state[model[0].weight]["step"]) == STEPS

    resumed = _resumed(kind, backend, path)
    out = tmp_path / "resumed.pt"
    _python(f"""
        import torch
        import conftest  # TRITON_INTERPRET, as in the test session
        from test_serialization import _resumed
        torch.save(_resumed({kind!r}, {backend!r}, {str(path)!r}), {str(out)!r})
    """)
    other_process = torch.load(out, weights_only=True)
    for i, (a, b, c) in enumerate(zip(uninterrupted, resumed, other_process)):
        assert torch.equal(a, b), f"param {i}: resumed in this process differs by {(a - b).abs().max().item():.3g}"
        assert torch.equal(a, c), f"param {i}: resumed in another process differs by {(a - c).abs().max():.3g}"
