"""The ``kfacvi`` command line.

``kfacvi train --preset NAME [--FIELD VALUE ...] [--out DIR] [--data-dir PATH] [--device cpu|cuda]``
trains a preset of :mod:`pyro_kfacvi.presets`; every :class:`~pyro_kfacvi.presets.TrainConfig`
field has an override flag (``--base-lr``, ``--lr-scale``, ``--rho``, ``--mc-samples``,
``--channels 32,64``, ``--train-subset 10000``, ...). ``kfacvi train --resume DIR`` continues a
run from its checkpoint. ``kfacvi evaluate --checkpoint PATH --test-samples S`` prints the Monte
Carlo test metrics of a checkpoint as JSON.

``kfacvi baseline --method adam|sgd|mc-dropout|mean-field|ivon|laplace --out DIR [--FIELD VALUE ...]``
trains a baseline of :mod:`pyro_kfacvi.baselines` (every :class:`~pyro_kfacvi.baselines.BaselineConfig`
field has a flag); ``ivon`` and ``laplace`` need the optional extra ``[peers]``
(:mod:`pyro_kfacvi.experiments.peers`; without it the command says what to install and exits 2).
``kfacvi analyze --checkpoint PATH --out DIR`` runs the uncertainty analysis of
:mod:`pyro_kfacvi.analysis` on either kind of checkpoint: ``DIR/report.json`` and PNG figures.

``kfacvi calibrate --checkpoint PATH --out DIR`` puts a Kronecker-factored Laplace posterior around a run
trained with ``--validation N``, chooses its prior variance on the N held-out images and writes the test
metrics before and after (:mod:`pyro_kfacvi.experiments.calibration`).

``kfacvi compare --group LABEL GLOB [--group ...] [--json F] [--markdown F] [--figure F]`` prints mean ± sd
over seeds of groups of runs or reports (:mod:`pyro_kfacvi.experiments.compare`).

``kfacvi payload --preset NAME`` prints the bytes one step all-reduces per layer under ``--parallel``.

``torchrun --nproc_per_node=N -m pyro_kfacvi train --preset NAME --parallel samples|data|both``
trains with N processes (docs/distributed.md); ``--device cuda`` gives each its ``cuda:LOCAL_RANK``.

The data folder is ``--data-dir``, else the ``KFACVI_DATA`` environment variable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import types
import typing
from pathlib import Path

from ..curvature import FISHER_TYPES, KFAC_APPROXIMATIONS
from ..distributed import MODES, init_process_group, launched_by_torchrun, payload_bytes
from ..engine import NONFINITE_POLICIES, WEIGHT_DECAY_MODES
from . import compare
from .baselines import METHODS, BaselineConfig
from .peers import PeerNotInstalled, require
from .checkpoints import CheckpointError, atomic_write
from .models import MODELS
from .presets import OPTIMIZERS, PRESETS, TrainConfig, build

_CHOICES = {"optimizer": tuple(OPTIMIZERS), "fisher": FISHER_TYPES, "method": tuple(METHODS), "parallel": MODES,
            "on_nonfinite": NONFINITE_POLICIES, "kfac_approx": KFAC_APPROXIMATIONS,
            "weight_decay_mode": WEIGHT_DECAY_MODES, "model": tuple(sorted(MODELS))}


def _optional(parse, name):
    def parser(text):
        if text.strip().lower() in ("none", "null", ""):
            return None
        return parse(text)
    parser.__name__ = name
    return parser


def _int_tuple(text):
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64, got {text!r}") from None


def _bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parser_for(hint):
    """An argparse ``type`` for a TrainConfig field annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _optional(_parser_for(inner), f"optional {getattr(inner, '__name__', inner)}")
    if typing.get_origin(hint) is tuple:
        return _int_tuple
    if hint is bool:
        return _bool
    return {int: int, float: float, str: str}[hint]


def add_config_overrides(parser: argparse.ArgumentParser, config_cls=TrainConfig) -> None:
    """One ``--field-name`` flag per field of ``config_cls`` (absent from the namespace unless given)."""
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group("hyperparameter overrides (default: the preset's value)")
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        kwargs = {"dest": f"override_{field.name}", "default": argparse.SUPPRESS, "type": _parser_for(hints[field.name])}
        if field.name in _CHOICES:
            kwargs["choices"] = _CHOICES[field.name]
        else:
            kwargs["metavar"] = field.name.upper()
        if field.name in ("channels", "hidden"):
            kwargs["help"] = "LeNet5 sizes, e.g. 32,64 ('none': the network's default)"
        elif field.name in ("rho", "train_subset", "kl_clip"):
            kwargs["help"] = "a number, or 'none'"
        elif field.name == "validation":
            kwargs["help"] = ("tuning: hold out the last N training images and report the 'test_' metrics on them "
                              "(the test set is not used)")
        group.add_argument(flag, **kwargs)


def overrides(args) -> dict:
    prefix = "override_"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def config_from_args(args) -> TrainConfig:
    """The preset with the command line's overrides applied (see :meth:`TrainConfig.replace`)."""
    config = PRESETS[args.preset]
    changes = overrides(args)
    return config.replace(**changes) if changes else config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kfacvi", allow_abbrev=False, description="Natural-gradient VI with Kronecker-factored "
                                     "Gaussian posteriors (K-FAC, KFAC-VI, Noisy K-FAC) on CIFAR-10.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a preset", allow_abbrev=False)
    train.add_argument("--preset", choices=sorted(PRESETS), help="configuration to start from")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    train.add_argument("--out", metavar="DIR", help="run folder (default: runs/PRESET-TIMESTAMP)")
    train.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                       help="also write the checkpoint every N steps (default 0: at epoch ends only)")
    _common(train)
    add_config_overrides(train)

    ev = sub.add_parser("evaluate", help="Monte Carlo test metrics of a checkpoint (JSON on stdout)",
                        allow_abbrev=False)
    ev.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint.pt or its run folder")
    ev.add_argument("--test-samples", type=int, metavar="S", help="posterior samples (default: the run's)")
    ev.add_argument("--output", metavar="FILE", help="also write the JSON here (default: RUN/evaluation-S<S>.json)")
    _common(ev)

    base = sub.add_parser("baseline", help="train a baseline (Adam, SGD, MC dropout, mean-field SVI, IVON, "
                          "Kronecker Laplace)",
                          allow_abbrev=False)
    base.add_argument("--out", required=True, metavar="DIR", help="run folder")
    _common(base)
    add_config_overrides(base, BaselineConfig)

    an = sub.add_parser("analyze", help="calibration, dataset shift and OOD analysis of a checkpoint",
                        allow_abbrev=False)
    an.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint.pt or its run folder")
    an.add_argument("--out", required=True, metavar="DIR", help="folder for report.json and the figures")
    an.add_argument("--test-samples", type=int, metavar="S", help="posterior samples (default: the run's)")
    an.add_argument("--shift-size", type=int, default=2000, metavar="N",
                    help="test images per corruption and severity (default 2000)")
    an.add_argument("--ood-size", type=int, default=2000, metavar="N", help="images per OOD set (default 2000)")
    an.add_argument("--seed", type=int, default=0, help="seed of the corruptions, OOD sets and weight samples")
    an.add_argument("--laplace-prior-variance", type=float, metavar="ETA",
                    help="analyse the run's Kronecker Laplace posterior with prior variance ETA instead of its "
                         "guide (kfacvi calibrate's choice: calibration.prior_variance in its metrics.json)")
    an.add_argument("--fashion-mnist", metavar="PATH", help="folder of Fashion-MNIST's idx files "
                    "(default: $KFACVI_FASHION_MNIST, else the Debian package's; skipped if absent)")
    _common(an)

    cal = sub.add_parser("calibrate", help="a Kronecker Laplace posterior around a run trained with --validation N, "
                         "its prior variance chosen on the N held-out images; test metrics", allow_abbrev=False)
    cal.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint.pt or its run folder")
    cal.add_argument("--out", required=True, metavar="DIR", help="folder for metrics.json and trained/metrics.json")
    cal.add_argument("--test-samples", type=int, default=20, metavar="S",
                     help="posterior samples for validation and test (default 20)")
    _common(cal)

    compare.add_arguments(sub.add_parser("compare", help="mean ± sd over seeds of groups of runs: table, JSON, figure",
                                         allow_abbrev=False))
    sub.add_parser("presets", help="list the presets as JSON", allow_abbrev=False)
    payload = sub.add_parser("payload", help="bytes all-reduced per step and layer under --parallel",
                             allow_abbrev=False)
    payload.add_argument("--preset", default="lenet5-kfacvi", choices=sorted(PRESETS))
    return parser


def _common(parser):
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--data-dir", metavar="PATH", help="folder holding cifar-10-batches-py (default: $KFACVI_DATA)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_data(args):
    from .data import cifar10
    return cifar10(args.data_dir, device=args.device)


def _setup(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("kfacvi: error: --device cuda but CUDA is not available")


def cmd_train(args, parser) -> int:
    """Train; launched by torchrun, as one process of its group (NCCL on ``cuda``, Gloo on ``cpu``)."""
    if not launched_by_torchrun():
        return _train(args, parser)
    import torch.distributed as dist

    args.device = str(init_process_group(args.device))
    try:
        return _train(args, parser)
    finally:
        dist.destroy_process_group()


def _train(args, parser) -> int:
    from .training import Trainer, TrainingDiverged, TrainingInterrupted

    progress = not args.no_progress and sys.stderr.isatty()
    if args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.resume:
        if args.preset or overrides(args):
            parser.error("--resume continues the checkpoint's configuration: --preset and overrides are not allowed")
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            parser.error("--resume writes into the resumed folder; drop --out")
        _setup(args)
        trainer = Trainer.resume(args.resume, _load_data(args), progress=progress,
                                 checkpoint_every=args.checkpoint_every)
    else:
        if not args.preset:
            parser.error(f"--preset is required (one of: {', '.join(sorted(PRESETS))}) unless --resume is given")
        try:
            config = config_from_args(args)
        except (ValueError, TypeError) as exc:
            parser.error(str(exc))
        out = Path(args.out) if args.out else Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (out / "checkpoint.pt").exists():
            parser.error(f"{out} already holds a run; use --resume {out} or another --out")
        _setup(args)
        trainer = Trainer(config, _load_data(args), out_dir=out, progress=progress,
                          checkpoint_every=args.checkpoint_every)
    if trainer.parallel is None and launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        parser.error(f"{os.environ['WORLD_SIZE']} processes would train {os.environ['WORLD_SIZE']} separate copies: "
                     f"choose --parallel {'|'.join(MODES)}")
    try:
        trainer.run()
    except TrainingDiverged as exc:
        print(f"kfacvi: error: {exc}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:
        print(f"kfacvi: {exc}", file=sys.stderr)
        return 130  # the shell's code for a SIGINT-terminated command
    if trainer.out_dir is not None:
        print(f"wrote {trainer.out_dir}/metrics.json, curves.png, checkpoint.pt")
    return 0


def cmd_evaluate(args, parser) -> int:
    from .evaluation import eval_seed, evaluate
    from .training import Trainer

    _setup(args)
    trainer = Trainer.from_checkpoint(args.checkpoint, _load_data(args))
    samples = args.test_samples if args.test_samples is not None else trainer.config.test_samples
    if samples < 0:
        parser.error("--test-samples must be >= 0 (0: the posterior mean)")
    start = time.perf_counter()
    result = {"checkpoint": str(args.checkpoint), "epoch": trainer.epoch, "iteration": trainer.engine.iteration,
              "test_samples": samples}
    result.update(evaluate(trainer.model, trainer.guide, trainer.data.test, samples,
                           eval_seed(trainer.config.seed, None), "test_"))
    result["eval_time"] = time.perf_counter() - start
    text = json.dumps(result, indent=2)
    print(text)
    path = Path(args.checkpoint)
    run_dir = path if path.is_dir() else path.parent
    output = Path(args.output) if args.output else run_dir / f"evaluation-S{samples}.json"
    try:
        atomic_write(output, lambda f: f.write((text + "\n").encode()))
    except OSError as exc:
        print(f"kfacvi: warning: could not write {output}: {exc}", file=sys.stderr)
    return 0


def cmd_baseline(args, parser) -> int:
    from .baselines import train

    try:
        config = BaselineConfig(**overrides(args))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    out = Path(args.out)
    if (out / "checkpoint.pt").exists():
        parser.error(f"{out} already holds a run; use another --out")
    require(config.method)  # a peer's package, before the data is loaded
    _setup(args)
    train(config, _load_data(args), out_dir=out)
    print(f"wrote {out}/metrics.json, checkpoint.pt")
    return 0


def cmd_analyze(args, parser) -> int:
    from .analysis import analyze_checkpoint

    if args.test_samples is not None and args.test_samples < 0:
        parser.error("--test-samples must be >= 0")
    if min(args.shift_size, args.ood_size) < 1:
        parser.error("--shift-size and --ood-size must be >= 1")
    if args.laplace_prior_variance is not None and not args.laplace_prior_variance > 0:
        parser.error("--laplace-prior-variance must be > 0")
    _setup(args)
    report = analyze_checkpoint(args.checkpoint, _load_data(args), args.out, num_samples=args.test_samples,
                                shift_size=args.shift_size, ood_size=args.ood_size, seed=args.seed,
                                fashion_mnist=args.fashion_mnist, log=print,
                                laplace_prior_variance=args.laplace_prior_variance)
    print(json.dumps(report["summary"], indent=2))
    return 0


def cmd_calibrate(args, parser) -> int:
    from .calibration import calibrate, write_metrics
    from .training import Trainer

    if args.test_samples < 1:
        parser.error("--test-samples must be >= 1")
    _setup(args)
    data = _load_data(args)
    trainer = Trainer.from_checkpoint(args.checkpoint, data)
    start = time.perf_counter()
    try:
        trained, calibrated, calibration = calibrate(trainer, data, args.test_samples, log=print)
    except ValueError as exc:
        parser.error(str(exc))
    calibration["time"] = time.perf_counter() - start
    out = Path(args.out)
    write_metrics(out / "metrics.json", trainer.config, calibrated, calibration=calibration,
                  checkpoint=str(args.checkpoint))
    write_metrics(out / "trained" / "metrics.json", trainer.config, trained, checkpoint=str(args.checkpoint))
    print(json.dumps({"prior_variance": calibration["prior_variance"], "trained": trained, "calibrated": calibrated},
                     indent=2))
    return 0


def cmd_payload(args) -> int:
    """The all-reduce payload per layer of a preset's network (docs/distributed.md)."""
    config = PRESETS[args.preset]
    _, guide, _ = build(config, num_data=50_000, steps_per_epoch=1)
    with_curvature, gradients_only = payload_bytes(guide), payload_bytes(guide, with_curvature=False)
    print(f"{config.model}: bytes all-reduced per step and rank (float32)")
    shapes = {block.name: "x".join(map(str, block.eigenbasis_loc.shape)) for block in guide.blocks}
    print(f"{'layer':<14}{'block':>12}{'gradients':>12}{'+ A and G':>12}")
    for name, size in with_curvature.items():
        print(f"{name:<14}{shapes.get(name, ''):>12}{gradients_only[name]:>12,}{size:>12,}")
    print(f"{'total':<14}{'':>12}{sum(gradients_only.values()):>12,}{sum(with_curvature.values()):>12,}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "presets":
        print(json.dumps({name: cfg.to_dict() for name, cfg in PRESETS.items()}, indent=2))
        return 0
    if args.command == "payload":
        return cmd_payload(args)
    if args.command == "compare":
        return compare.run(args)
    from .data import DataError
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "baseline": cmd_baseline, "analyze": cmd_analyze,
                "calibrate": cmd_calibrate}
    try:
        return commands[args.command](args, parser)
    except (DataError, CheckpointError, FileNotFoundError, PeerNotInstalled) as exc:
        print(f"kfacvi: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
