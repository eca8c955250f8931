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
    print(f"extension legw_fused._C: {'loaded' if ext['available'] else ext['reason']}; "
          f"CUDA sources {'compiled' if ext['with_cuda'] else 'not compiled'}; ops: {ext['ops']}")
    lstm = info.pop("lstm")
    cell_auto, cell_why = lstm.pop("auto_cell"), lstm.pop("auto_cell_why")
    for title, table in (("backend", info), ("LSTM", lstm)):
        auto, why = table.pop("auto"), table.pop("auto_why")
        print(f"\n{title:<8}{'devices':<9}{'available':<11}why not / what")
        for name, row in table.items():
            devices = row["device_types"] if isinstance(row["device_types"], str) else "/".join(row["device_types"])
            available = "yes" if row["available"] else "no"
            print(f"{name:<8}{devices:<9}{available:<11}{row['reason'] or row['description']}")
        print("auto picks: " + ", ".join(f"{dev} -> {name}" + (f" ({why[dev]})" if dev in why else "")
                                         for dev, name in auto.items()))
    print("auto picks for LSTMCell: " + ", ".join(f"{dev} -> {name}" + (f" ({cell_why[dev]})" if dev in cell_why
                                                                        else "") for dev, name in cell_auto.items()))
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
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(sched.total_steps), [sched(t) for t in range(sched.total_steps)])
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title(repr(sched), fontsize="small")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        plt.close(fig)
        print(f"# wrote {args.plot}", file=sys.stderr)
    return 0


def _demo(args) -> int:
    from . import demo

    demo.run(seed=args.seed, quiet=args.quiet)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _train(args) -> int:
    from .train import run
    from .train.data import require

    require(args.task)  # a missing data package fails here, before any work, with its install command
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    run(args.task, preset="full" if args.full else "quick", batch_sizes=args.batch_sizes, schemes=args.schemes,
        epochs=args.epochs, train_items=args.train_items, eval_items=args.eval_items, optimizer=args.optimizer,
        base_lr=args.base_lr, base_warmup_epochs=args.base_warmup_epochs,
        micro_batch=args.micro_batch or "auto", device=args.device,
        seeds=args.seeds if args.seeds is not None else [args.seed], out=args.out, resume=args.resume,
        quiet=args.quiet, argv=args.argv, distributed=args.distributed)
    return 0


def _bench(args) -> int:
    import importlib

    module = f"legw_fused.bench.{args.which}"
    try:
        bench = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in (module, "legw_fused.bench"):
            raise
        print(f"legw-fused bench {args.which}: error: {module} is not part of this install ({exc}); it is "
              f"bench/{args.which}.py in the repository, installed as {module} by `pip install .`", file=sys.stderr)
        return 2
    result = bench.main(args.args)
    return result if isinstance(result, int) else 0


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
    s.add_argument("--plot", metavar="FILE", help="also draw the schedule into this PNG file")
    s.set_defaults(func=_schedule)

    from .train import SCHEMES, TASKS

    t = sub.add_parser("train", help="LEGW batch-size sweep on real data (mnist: MNIST-LSTM; charlm: "
                                     "Shakespeare character LM); --quick (default) or --full",
                       description="Train the task's model at each batch size under each scheme, from one baseline "
                                   "tuned at batch 128; print a table and write results.json, results.md and plots.")
    t.add_argument("task", choices=sorted(TASKS))
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default: a few minutes on a 2-core CPU (a subset, "
                                                           "few epochs, batch 128/1024/4096, legw vs linear-goyal)")
    mode.add_argument("--full", action="store_true",
                      help="the paper-scale sweep (batch 128/512/2048/8192, all schemes; about an hour on a 2-core "
                           "CPU)")
    t.add_argument("--batch-sizes", type=_positive_int, nargs="+", metavar="B", help="override the preset's")
    t.add_argument("--schemes", nargs="+", choices=list(SCHEMES), metavar="SCHEME",
                   help=f"override the preset's; any of {', '.join(SCHEMES)}")
    t.add_argument("--epochs", type=_positive_int, help="override the preset's (the same at every batch size)")
    t.add_argument("--train-items", type=_positive_int, metavar="N",
                   help="use the first N training items (images / character windows)")
    t.add_argument("--eval-items", type=_positive_int, metavar="N", help="evaluate on the first N val/test items")
    t.add_argument("--optimizer", choices=["sgd", "lars"], default="sgd",
                   help="legw_fused.SGD (momentum) or legw_fused.LARS, each with its own tuned baseline")
    t.add_argument("--base-lr", type=float, metavar="LR", help="replace the tuned baseline's peak LR (for tuning it)")
    t.add_argument("--base-warmup-epochs", type=float, metavar="EPOCHS",
                   help="replace the tuned baseline's warmup epochs (for tuning it)")
    t.add_argument("--micro-batch", type=_positive_int, metavar="N",
                   help="compute each batch in chunks of N items, accumulating gradients (the same update); default "
                        "256 on a CPU (faster per sample there), whole batches on a GPU")
    t.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    seeds = t.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="the seed of initial weights and data order (default 0)")
    seeds.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                       help="train every (scheme, batch size) once per seed; the table gives mean ± standard "
                            "deviation over them, the metric plot error bars")
    t.add_argument("--distributed", choices=["ddp", "fsdp"],
                   help="under torchrun: DDP or FSDP2 over all ranks (gloo on CPU, NCCL on GPUs); --batch-sizes are "
                        "global batches, each rank computes batch / world size of them")
    t.add_argument("--out", default="results", help="output folder (results go to OUT/TASK/)")
    t.add_argument("--resume", action="store_true",
                   help="continue the sweep in OUT/TASK/ where it stopped (repeat its options): finished trainings "
                        "are kept, an interrupted one continues from its last epoch's checkpoint; without --resume "
                        "an unfinished sweep there is an error, a finished one is replaced")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    b = sub.add_parser("bench", help="run a benchmark (bench/optimizer.py or bench/lstm.py); further arguments "
                                     "go to it (legw-fused bench optimizer --help)")
    b.add_argument("which", choices=["optimizer", "lstm"])
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    b.set_defaults(func=_bench)

    d = sub.add_parser("demo", help="short LEGW demonstration on synthetic data (about a minute on 2 CPU cores)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from .train.data import MissingDataset

    try:
        return args.func(args)
    except (ValueError, TypeError, MissingDataset) as exc:
        print(f"legw-fused {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
