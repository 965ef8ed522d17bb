"""Run folders: how main.py lays out a run on disk, and how main.py and plot.py read it back.

    runs/<run>/config.json                         every setting of the run
    runs/<run>/<model>[/seed<k>]/stats.json        one row per completed epoch
    runs/<run>/<model>[/seed<k>]/last.pt           the model, optimizer and schedule, last epoch
    runs/latest                                    the newest run

A run folder is made only when training starts, under a name no other run has.
``runs/latest`` is a symlink, or, where the system refuses one (Windows without
the privilege), a text file holding the run's name; ``find_run`` follows either.
Every file is read with a check of its shape, and a damaged one is reported as a
``RunError``: one line naming the file and what to do.
"""

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import cli
import exposure
import machine
from dataset import DatasetError, load_splits
from files import atomic_open, write_json, write_text
from model import MODELS

LATEST = "latest"
VAL_SIZE = 5_000  # training images held out by default: the not-a-digit rule is fitted on them
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")
# The experiment's settings in config.json, with their types: a resumed run takes exactly these.
EXPERIMENT = {
    "model": list,
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "momentum": float,
    "weight_decay": float,
    "lr_schedule": str,
    "seeds": list,
    "per_seed": bool,
    "dropout": float,
    "no_batchnorm": bool,
    "no_augment": bool,
    "augment_without": list,
    "non_digits": list,
    "non_digit_share": float,
    "train_limit": (int, type(None)),
    "test_limit": (int, type(None)),
    "val_size": int,
    "data_dir": str,
}


class RunError(Exception):
    """A run's file is missing or damaged; the message is one line naming it and what to do."""


# ------------------------------------------------------------ the folder


def create_run_dir(out_dir, name=None):
    """Make a new run folder in ``out_dir``: ``name``, or the time, made unique with -2, -3, ...

    ``mkdir`` either creates the folder or fails, so two runs started in the same
    second, even in two processes, never share a folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if name is not None:
        (out_dir / name).mkdir()  # FileExistsError: main.py checks for it before any work
        return out_dir / name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        run_dir = out_dir / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"{out_dir}: a thousand runs named {stamp}")


def point_latest(run_dir):
    """Make ``OUT_DIR/latest`` name the run: a symlink, replaced atomically, or where symlinks are
    refused (Windows without Developer Mode) a small text file holding the run's name."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)
    except (OSError, NotImplementedError):
        tmp.unlink(missing_ok=True)
        # its rename replaces a symlink left there, as it would a file
        write_text(link, run_dir.name + "\n")


def find_run(path):
    """The run folder ``path`` names: itself, or the run a ``latest`` link or text file names."""
    path = Path(path)
    if path.is_file():
        try:
            target = path.parent / path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise RunError(f"{path}: cannot read the run it names ({e})") from None
        if not target.is_dir():
            raise RunError(f"{path}: names the run {target.name}, which is not in {path.parent}")
        return target.resolve()
    return path.resolve()


def job_dir(run_dir, model_name, seed, per_seed):
    return run_dir / model_name / f"seed{seed}" if per_seed else run_dir / model_name


# The models from the slowest epoch to the fastest, on a CPU and on a GPU alike
# (docs/performance.md).
SLOWEST_FIRST = ("lenet5_reg", "lenet5", "mlp")


def jobs(cfg, slowest_first=False):
    """(model, seed) of every job of a run, in the order one process trains them: seed by seed.

    ``slowest_first`` orders them by model instead, the slowest first: the order in which torchrun's
    ranks take them, so that a long job is never the last to start while the other ranks idle.
    """
    order = [(name, seed) for seed in cfg["seeds"] for name in cfg["model"]]
    return sorted(order, key=lambda job: SLOWEST_FIRST.index(job[0])) if slowest_first else order


def trained_jobs(run_dir):
    """(model, seed, folder) of each job that config.json lists and that has completed an epoch, in
    the run's order; folders it does not list (a job moved aside, say) are not the run's."""
    return [
        (name, seed, folder)
        for name, seed, folder in job_folders(run_dir)
        if (folder / "last.pt").is_file()
    ]


def job_folders(run_dir):
    """(model, seed, folder) of every job that the run's config.json lists, in the run's order."""
    cfg = read_config(run_dir)
    return [(name, seed, job_dir(run_dir, name, seed, cfg["per_seed"])) for name, seed in jobs(cfg)]


# ------------------------------------------------------------ files


def save_checkpoint(path, obj):
    with atomic_open(path) as f:
        torch.save(obj, f)


def read_json(path):
    """A JSON file's content; RunError when it cannot be read or is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: cannot read it ({e})") from None
    except json.JSONDecodeError:
        raise RunError(f"{path}: not valid JSON (cut short, or edited by hand?)") from None


def _is(value, kind):
    if kind is float:
        kind = (int, float)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def where_data(cfg):
    """The settings of where a run's data are: a resume may move them; config.json follows."""
    return {key: cfg[key] for key in ("data_dir", "idx_dir")}


def read_config(run_dir):
    """A run's config.json, with every setting of the experiment present and of the right type."""
    path = Path(run_dir) / "config.json"
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise RunError(f"{path}: not a config.json of main.py (not a JSON object)")
    # a run's config.json may lack it: such a run held none out
    cfg.setdefault("val_size", 0)
    # nor this: its augmentation had no free strokes and no hollow look
    cfg.setdefault("augment_without", ["hollow", "strokes"])
    cfg.setdefault("non_digits", [])  # and no outlier exposure
    cfg.setdefault("non_digit_share", 0.25)  # or, where it had some, one per four digits
    wrong = [key for key, kind in EXPERIMENT.items() if not _is(cfg.get(key), kind)]
    if not wrong:
        wrong = [key for key in ("model", "seeds") if not cfg[key]]
        wrong += ["model"] if any(name not in MODELS for name in cfg["model"]) else []
        wrong += ["seeds"] if not all(_is(seed, int) for seed in cfg["seeds"]) else []
    if wrong:
        raise RunError(
            f"{path}: not a config.json of main.py (setting {wrong[0]!r} is missing or wrong)"
        )
    return cfg


def read_stats(path):
    """A job's stats.json, checked: its fields, and one row of numbers per epoch, from 1."""
    stats = read_json(path)
    problem = None
    if not isinstance(stats, dict):
        problem = "not a JSON object"
    elif not isinstance(stats.get("model"), str) or not _is(stats.get("params"), int):
        problem = "the field 'model' or 'params' is missing or wrong"
    elif not isinstance(stats.get("epochs"), list):
        problem = "the field 'epochs' is missing or not a list"
    else:
        for number, row in enumerate(stats["epochs"], 1):
            if not isinstance(row, dict) or not all(
                _is(row.get(key), float) for key in EPOCH_FIELDS
            ):
                problem = f"epoch row {number} lacks a field or has one that is not a number"
            elif row["epoch"] != number:
                problem = f"epoch row {number} is numbered {row['epoch']}"
            if problem:
                break
    if problem:
        raise RunError(f"{path}: not a stats.json of main.py ({problem})")
    return stats


def load_checkpoint(path, device="cpu"):
    """A checkpoint saved by main.py (a dict of tensors and numbers); RunError when unreadable."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    # a truncated zip, a foreign pickle, ...: any failure means the file is unusable
    except Exception as e:
        raise RunError(f"{path}: not a readable checkpoint ({cli.first_line(e)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("epoch"), int):
        raise RunError(f"{path}: not a checkpoint of main.py")
    return checkpoint


def restore(path, checkpoint, what, **modules):
    """Give each of ``modules`` (model=, optimizer=, scheduler=) its state from ``checkpoint``, read
    from ``path``; RunError naming the file when one does not fit ``what`` (a model, a job)."""
    try:
        for key, module in modules.items():
            module.load_state_dict(checkpoint[key])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"{path}: not a checkpoint of {what} ({cli.first_line(e)})") from None


def load_model(folder):
    """The model a job folder ended with (last.pt, the weights its results table reports), in eval
    mode on the CPU, and that epoch's stats.json row; RunError naming the file when either is
    unusable."""
    folder = Path(folder)
    last, stats = saved_state(folder, "cpu")
    if last is None:
        raise RunError(f"{folder / 'last.pt'}: missing")
    name = stats["model"]
    try:
        model = MODELS[name](**stats.get("kwargs", {}))
    except (KeyError, TypeError) as e:
        raise RunError(
            f"{folder / 'stats.json'}: names no model of model.py ({cli.first_line(e)})"
        ) from None
    restore(folder / "last.pt", last, name, model=model)
    return model.to(memory_format=MODELS[name].memory_format).eval(), stats["epochs"][-1]


def save_epoch(out, stats, model, optimizer, scheduler):
    """A job's files after an epoch: stats.json, then last.pt. last.pt is written last: it marks the
    epoch complete (``saved_state`` trims stats.json to its epoch)."""
    write_json(out / "stats.json", stats)
    state = {
        "epoch": stats["epochs"][-1]["epoch"],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    save_checkpoint(out / "last.pt", state)


def saved_state(out, device):
    """(last.pt, stats) of a job folder that holds completed epochs, else (None, None); RunError if
    damaged.

    last.pt is written last in an epoch, so it says how many epochs are complete: stats.json
    rows after its epoch (a kill between the two writes) are dropped.
    """
    if not (out / "last.pt").exists():
        return None, None
    last = load_checkpoint(out / "last.pt", device)
    stats = read_stats(out / "stats.json")
    if len(stats["epochs"]) < last["epoch"]:
        raise RunError(
            f"{out / 'stats.json'}: holds {len(stats['epochs'])} epochs,"
            f" but last.pt is from epoch {last['epoch']}"
        )
    del stats["epochs"][last["epoch"] :]
    return last, stats


def load_config(args):
    """(run folder, or None for a new run; settings): from the command line, or config.json when
    resuming.

    The data folder is kept as an absolute path, so --resume and plot.py find it from any folder.
    """
    if args.resume is not None:
        cfg = read_config(args.resume)
        for key in ("data_dir", "idx_dir"):  # where the data are may change; what they are may not
            if getattr(args, key) is not None:
                cfg[key] = str(getattr(args, key).resolve())
        cfg.update(resume=str(args.resume), quiet=args.quiet)
        return args.resume, cfg
    cfg = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "device"}
    cfg["data_dir"] = str(args.data_dir.resolve())
    cfg["idx_dir"] = args.idx_dir and str(args.idx_dir.resolve())
    cfg["seeds"] = args.seeds or [args.seed]
    cfg["per_seed"] = args.seeds is not None
    return None, cfg


def load_data(args, cfg, prefix):
    """(training set, test set) of the run, on its device; (None, None) when they are unusable, and
    it has said why."""
    data_dir = args.data_dir or cfg["data_dir"]
    try:
        sets = load_splits(
            data_dir, cfg["idx_dir"], args.device, cfg["train_limit"], cfg["test_limit"]
        )
        exposure.require(cfg["non_digits"])
    except DatasetError as e:
        cli.error(e, prefix)
        return None, None
    if cfg["val_size"] is None:
        cfg["val_size"] = min(VAL_SIZE, len(sets[0]) // 10)
    if cfg["val_size"] > len(sets[0]) - 2:
        left = f"fewer than 2 of the {len(sets[0])} training images to train on"
        cli.error(f"--val-size {cfg['val_size']} leaves {left}", prefix)
        return None, None
    return sets


def record_launch(run_dir, cfg, device, ranks):
    """Add where and how this launch runs to ``cfg``, and return what rank 0 writes to config.json:
    a new run's config holds the launch at the top, and a resume adds it to the run's "resumes",
    leaving the record of how the run was made as it was."""
    launch = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": machine.cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "world_size": ranks.world_size,
    }
    cfg.update(launch)
    # before any slow step
    processes = ranks.gather("rank", ranks.record(device, cfg["threads"]))
    if ranks.several:
        launch["ranks"] = cfg["ranks"] = processes
    if run_dir is None:
        return cfg
    saved = {**read_json(run_dir / "config.json"), **where_data(cfg)}
    saved["resumes"] = [*saved.get("resumes", []), launch]
    return saved


def open_run(args, run_dir, cfg, saved, prefix):
    """Rank 0: make a new run's folder (only now, with the data ready), write its config.json and
    point ``latest`` at it; (run folder, exit code: None when it could)."""
    try:
        if run_dir is None:
            run_dir = create_run_dir(args.out_dir, args.run_name)
            cfg["run_name"] = run_dir.name
        write_json(run_dir / "config.json", saved)
        point_latest(run_dir)
    except OSError as e:
        cli.error(
            f"{e.filename or args.out_dir}: cannot write the run there ({e.strerror})", prefix
        )
        return run_dir, 1
    return run_dir, None


# ------------------------------------------------------------ what a run says at the end


def mean_std(values, digits=2):
    """Fractions as percent: the one value, or mean ± sample std over seeds."""
    if len(values) == 1:
        return f"{values[0] * 100:.{digits}f}%"
    mean, std = statistics.fmean(values) * 100, statistics.stdev(values) * 100
    return f"{mean:.{digits}f} ± {std:.{digits}f}%"


def seeds_note(count):
    return f", mean and ±1 std band over {count} seeds" if count > 1 else ""


def epoch_line(name, seed, epochs, row):
    """The line an epoch prints: its losses and accuracies, and how long it took."""
    val = f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:7.2%}" if "val_acc" in row else ""
    return (
        f"{name:<10} seed {seed} epoch {row['epoch']:>{len(str(epochs))}}/{epochs}"
        f" | train loss {row['train_loss']:.4f} acc {row['train_acc']:7.2%}{val}"
        f" | test loss {row['test_loss']:.4f} acc {row['test_acc']:7.2%} | {row['seconds']:5.1f} s"
    )


def summary(run_dir, cfg):
    """The table of a run's jobs: model, seed, epochs, test (and validation) accuracy, minutes."""
    val = cfg["val_size"] > 0
    lines = [
        f"{'model':<10}  {'seed':>4}  {'epochs':>6}  {'test acc':>8}  "
        + ("val acc  " * val)
        + "minutes"
    ]
    for name, seed in jobs(cfg):
        path = job_dir(run_dir, name, seed, cfg["per_seed"]) / "stats.json"
        try:
            rows = read_stats(path)["epochs"]
        except RunError:
            rows = []
        if not rows:
            lines.append(f"{name:<10}  {seed:>4}  {0:>6}  not trained")
            continue
        minutes = sum(row["seconds"] for row in rows) / 60
        val_text = f"{rows[-1].get('val_acc', math.nan):>7.2%}  " if val else ""
        lines.append(
            f"{name:<10}  {seed:>4}  {len(rows):>6}  {rows[-1]['test_acc']:>8.2%}"
            f"  {val_text}{minutes:>7.1f}"
        )
    return "\n".join(lines)
