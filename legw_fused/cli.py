"""The ``legw-fused`` command (also ``python -m legw_fused``)."""

from __future__ import annotations

import argparse
import sys

import torch


def _info(_args) -> int:
    import triton  # noqa: F401  (reported only)

    from . import __version__, backend_info

    print(f"legw_fused {__version__}  torch {torch.__version__}  triton {triton.__version__}  "
          f"CUDA available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    info = backend_info()
    ext = info.pop("extension")
    auto = info.pop("auto")
    print(f"extension legw_fused._C: {'loaded' if ext['available'] else ext['reason']}; "
          f"CUDA sources {'compiled' if ext['with_cuda'] else 'not compiled'}; ops: {ext['ops']}")
    print(f"{'backend':<8}{'devices':<9}{'available':<11}why not / what")
    for name, row in info.items():
        devices = row["device_types"] if isinstance(row["device_types"], str) else "/".join(row["device_types"])
        print(f"{name:<8}{devices:<9}{'yes' if row['available'] else 'no':<11}{row['reason'] or row['description']}")
    print("auto picks: " + ", ".join(f"{dev} -> {name}" for dev, name in auto.items()))
    return 0


def _schedule(args) -> int:
    from .schedule import LEGW

    sched = LEGW(args.base_lr, args.base_batch_size, args.batch_size, args.base_warmup_epochs, args.steps_per_epoch,
                 args.epochs, decay=args.decay, power=args.power, end_lr=args.end_lr, gamma=args.gamma,
                 milestones=tuple(args.milestones), scaling=args.scaling, warmup_scaling=args.warmup_scaling)
    print(f"# {sched!r}")
    print("step\tlr")
    every = max(1, args.every)
    for t in range(0, sched.total_steps, every):
        print(f"{t}\t{sched(t):.10g}")
    return 0


def _demo(args) -> int:
    from . import demo

    demo.run(seed=args.seed, quiet=args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="legw-fused", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, device and the backend table with reasons").set_defaults(func=_info)

    s = sub.add_parser("schedule", help="print a LEGW schedule, one line per step")
    s.add_argument("--base-lr", type=float, required=True)
    s.add_argument("--base-batch-size", type=int, required=True)
    s.add_argument("--batch-size", type=int, required=True)
    s.add_argument("--base-warmup-epochs", type=float, required=True)
    s.add_argument("--steps-per-epoch", type=float, required=True)
    s.add_argument("--epochs", type=float, required=True)
    s.add_argument("--decay", default="poly")
    s.add_argument("--power", type=float, default=2.0)
    s.add_argument("--end-lr", type=float, default=0.0)
    s.add_argument("--gamma", type=float, default=0.1)
    s.add_argument("--milestones", type=float, nargs="*", default=[])
    s.add_argument("--scaling", default="sqrt")
    s.add_argument("--warmup-scaling", default="linear")
    s.add_argument("--every", type=int, default=1, help="print every N-th step")
    s.set_defaults(func=_schedule)

    d = sub.add_parser("demo", help="short LEGW demonstration on synthetic data (about a minute on 2 CPU cores)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        print(f"legw-fused {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
