"""Run folders: how main.py lays out a run on disk, and how main.py and plot.py read it back.

    runs/<run>/config.json                         every setting of the run
    runs/<run>/<model>[/seed<k>]/stats.json        one row per completed epoch
    runs/<run>/<model>[/seed<k>]/last.pt           the model, optimizer and schedule after the last epoch
    runs/latest                                    the newest run

A run folder is made only when training starts, under a name no other run has.
``runs/latest`` is a symlink, or, where the system refuses one (Windows without
the privilege), a text file holding the run's name; ``find_run`` follows either.
Every file is read with a check of its shape, and a damaged one is reported as a
``RunError``: one line naming the file and what to do.

Under ``torchrun`` a run's jobs are spread over its processes (``Ranks``): rank 0
makes the run folder, and every rank takes the next job from a counter in
torch.distributed's store whenever it is free, so each job is trained exactly once.
"""

import json
import math
import os
import shlex
import socket
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed

from dataset import atomic_open, write_text
from model import MODELS

LATEST = "latest"
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
    "train_limit": (int, type(None)),
    "test_limit": (int, type(None)),
    "val_size": int,
    "data_dir": str,
}


class RunError(Exception):
    """A run's file is missing or damaged; the message is one line naming it and what to do."""


class RanksLost(Exception):
    """The store that torchrun's ranks share has closed: the process that served it has ended."""


# --------------------------------------------------------------------------- the folder


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
        write_text(link, run_dir.name + "\n")  # its rename replaces a symlink left there, as it would a file


def find_run(path):
    """The run folder that ``path`` names: itself, or the run a ``latest`` symlink or text file points to."""
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


# The models from the slowest epoch to the fastest, on a CPU and on a GPU alike (docs/performance.md).
SLOWEST_FIRST = ("lenet5_reg", "lenet5", "mlp")


def jobs(cfg, slowest_first=False):
    """(model, seed) of every job of a run, in the order one process trains them: seed by seed.

    ``slowest_first`` orders them by model instead, the slowest first: the order in which torchrun's
    ranks take them, so that a long job is never the last to start while the other ranks idle.
    """
    order = [(name, seed) for seed in cfg["seeds"] for name in cfg["model"]]
    return sorted(order, key=lambda job: SLOWEST_FIRST.index(job[0])) if slowest_first else order


def trained_jobs(run_dir):
    """(model, seed, folder) of each job that config.json lists and that has completed an epoch, in the
    run's order; folders it does not list (a job moved aside, say) are not the run's."""
    return [(name, seed, folder) for name, seed, folder in job_folders(run_dir) if (folder / "last.pt").is_file()]


def job_folders(run_dir):
    """(model, seed, folder) of every job that the run's config.json lists, in the run's order."""
    cfg = read_config(run_dir)
    return [(name, seed, job_dir(run_dir, name, seed, cfg["per_seed"])) for name, seed in jobs(cfg)]


# --------------------------------------------------------------------------- files


def write_json(path, obj):
    """``obj`` as JSON in UTF-8; a folder name that is not text in the system's encoding is kept as JSON
    escapes (\\udcXX), so that reading the file back gives the same path."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=2)
    write_text(path, text + "\n")


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
    """The settings that say where a run's data are: a resume may move them, and config.json follows."""
    return {key: cfg[key] for key in ("data_dir", "idx_dir")}


def read_config(run_dir):
    """A run's config.json, with every setting of the experiment present and of the right type."""
    path = Path(run_dir) / "config.json"
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise RunError(f"{path}: not a config.json of main.py (not a JSON object)")
    cfg.setdefault("val_size", 0)  # runs made before --val-size held none out
    wrong = [key for key, kind in EXPERIMENT.items() if not _is(cfg.get(key), kind)]
    if not wrong:
        wrong = [key for key in ("model", "seeds") if not cfg[key]]
        wrong += ["model"] if any(name not in MODELS for name in cfg["model"]) else []
        wrong += ["seeds"] if not all(_is(seed, int) for seed in cfg["seeds"]) else []
    if wrong:
        raise RunError(f"{path}: not a config.json of main.py (setting {wrong[0]!r} is missing or wrong)")
    return cfg


def read_stats(path):
    """A job's stats.json, checked: its fields, and one row of numbers per epoch, numbered from 1."""
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
            if not isinstance(row, dict) or not all(_is(row.get(key), float) for key in EPOCH_FIELDS):
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
    except Exception as e:  # a truncated zip, a foreign pickle, ...: any failure means the file is unusable
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("epoch"), int):
        raise RunError(f"{path}: not a checkpoint of main.py")
    return checkpoint


def load_model(folder):
    """The model a job folder ended with (last.pt, the weights its results table reports), in eval mode
    on the CPU, and that epoch's stats.json row; RunError naming the file when either is unusable."""
    folder = Path(folder)
    last, stats = saved_state(folder, "cpu")
    if last is None:
        raise RunError(f"{folder / 'last.pt'}: missing")
    try:
        model = MODELS[stats["model"]](**stats.get("kwargs", {}))
        model.load_state_dict(last["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{folder / 'last.pt'}: not a checkpoint of {stats['model']} ({reason})") from None
    model = model.to(memory_format=MODELS[stats["model"]].memory_format)
    return model.eval(), stats["epochs"][-1]


def saved_state(out, device):
    """(last.pt, stats) of a job folder that holds completed epochs, else (None, None); RunError if damaged.

    last.pt is written last in an epoch, so it says how many epochs are complete: stats.json
    rows after its epoch (a kill between the two writes) are dropped.
    """
    if not (out / "last.pt").exists():
        return None, None
    last = load_checkpoint(out / "last.pt", device)
    stats = read_stats(out / "stats.json")
    if len(stats["epochs"]) < last["epoch"]:
        raise RunError(
            f"{out / 'stats.json'}: holds {len(stats['epochs'])} epochs, but last.pt is from epoch {last['epoch']}"
        )
    del stats["epochs"][last["epoch"] :]
    return last, stats


# --------------------------------------------------------------------------- what a run says at the end


def summary(run_dir, cfg):
    """The table of a run's jobs: model, seed, epochs, final test (and validation) accuracy, minutes."""
    val = cfg["val_size"] > 0
    lines = [f"{'model':<10}  {'seed':>4}  {'epochs':>6}  {'test acc':>8}  " + ("val acc  " * val) + "minutes"]
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
        lines.append(f"{name:<10}  {seed:>4}  {len(rows):>6}  {rows[-1]['test_acc']:>8.2%}  {val_text}{minutes:>7.1f}")
    return "\n".join(lines)


def command(*args):
    """A command line that this system's shell takes back as the same arguments (spaces, quotes, any script)."""
    args = [str(a) for a in args]
    return subprocess.list2cmdline(args) if os.name == "nt" else shlex.join(args)


# --------------------------------------------------------------------------- the processes of a run


class Ranks:
    """The processes a run is spread over: just this one (``python main.py``), or torchrun's ranks.

    torchrun starts every rank with RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE set, and serves
    a key-value store that they reach through ``torch.distributed.rendezvous``. Through it rank 0
    gives the others the run folder, and the ranks take jobs from one counter as each becomes free.
    Waits poll the store, so Ctrl-C and SIGTERM reach a waiting rank at once.
    """

    def __init__(self, rank=0, world_size=1, local_rank=0, local_world_size=1):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.store = None

    @classmethod
    def from_env(cls):
        """The ranks torchrun describes in the environment; one process when it did not start this one."""
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        if not all(name in os.environ for name in names):
            return cls()
        return cls(*(int(os.environ[name]) for name in names))

    @property
    def spread(self):
        return self.world_size > 1

    @property
    def prefix(self):
        """What each printed line of this rank starts with: its rank, when there are several."""
        return f"rank {self.rank} | " if self.spread else ""

    def connect(self):
        """Join the other ranks through torchrun's store (only when there are several)."""
        if self.spread:
            self.store, _, _ = next(torch.distributed.rendezvous("env://"))

    def _call(self, method, *args):
        """A call on the shared store; RanksLost when its server is gone (rank 0 serves it under older torch)."""
        try:
            return getattr(self.store, method)(*args)
        except RuntimeError as e:  # torch.distributed.DistError, or a plain RuntimeError in older torch
            raise RanksLost(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None

    def share(self, key, value):
        """Give every rank ``value`` (a string) under ``key``."""
        self._call("set", key, value)
        self._call("add", f"{key} is set", 1)  # a counter can be read without waiting (torch 2.2's stores lack check)

    def wait(self, key):
        """The string another rank shared under ``key``, once it has."""
        while not self._call("add", f"{key} is set", 0):
            time.sleep(0.05)
        return self._call("get", key).decode()

    def gather(self, key, value):
        """Each rank shares ``value``; rank 0 gets every rank's, in rank order (the others get None)."""
        if not self.spread:
            return [value]
        self.share(f"{key}/{self.rank}", json.dumps(value))
        if self.rank != 0:
            return None
        return [json.loads(self.wait(f"{key}/{r}")) for r in range(self.world_size)]

    def take(self, count):
        """The indices of the jobs this rank trains, out of ``count``: each is handed to the first rank
        that asks for it, so a rank that finishes early takes the next one, and no job is taken twice."""
        if not self.spread:
            yield from range(count)
            return
        while (index := self._call("add", "jobs taken", 1) - 1) < count:
            yield index

    def finish(self, trained, failed):
        """Mark this rank done; rank 0 waits for every rank and gets the totals of epochs trained and
        jobs failed over all of them, the others their own."""
        if not self.spread:
            return trained, failed
        self._call("add", "epochs trained", trained)
        self._call("add", "jobs failed", failed)
        self._call("add", "ranks finished", 1)
        if self.rank != 0:
            return trained, failed
        while self._call("add", "ranks finished", 0) < self.world_size:
            time.sleep(0.05)
        return self._call("add", "epochs trained", 0), self._call("add", "jobs failed", 0)

    def first_to_stop(self):
        """Whether this is the first rank to stop early (Ctrl-C, or torchrun ending it because another
        rank failed): that one prints how to continue. Where rank 0 serves the store (older torch) and
        has ended, it was first, or it was killed and no rank can know who is first: False either way."""
        if not self.spread:
            return True
        try:
            return self._call("add", "ranks stopped", 1) == 1
        except RanksLost:
            return False

    def record(self, device, threads):
        """What config.json keeps of this rank: where it ran and how."""
        return {"rank": self.rank, "host": socket.gethostname(), "device": str(device), "threads": threads}

    def resume_command(self, run_dir):
        """The command that continues the run, launched the way this one was."""
        if not self.spread:
            return command("python", "main.py", "--resume", run_dir)
        if self.world_size == self.local_world_size:  # one machine
            launch = ("torchrun", "--standalone", f"--nproc-per-node={self.local_world_size}")
            return command(*launch, "main.py", "--resume", run_dir)
        return "torchrun [the same launch options] " + command("main.py", "--resume", run_dir)
