"""Train and test LeNet-5, CustomMLP and the regularized LeNet-5 on MNIST.

    python main.py                                   # all three models, 10 epochs each
    python main.py --model lenet5 --epochs 1         # one model, one epoch
    python main.py --seeds 0,1,2                     # every model once per seed
    python main.py --resume runs/20261128-130000     # continue an interrupted run
    torchrun --standalone --nproc-per-node=2 main.py --seeds 0,1,2   # the jobs spread over 2 processes

Each run writes RUN_DIR/config.json and, per model (and per seed with --seeds),
stats.json and last.pt (the model after its last completed epoch), both rewritten atomically
after every epoch. With --val-size N the last N training images are held out and each epoch
reports the accuracy on them beside the test set's, for choices made without the test set.
"""

import argparse
import contextlib
import functools
import math
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

import runs
from dataset import DatasetError, batch_loader, load_splits, safe_console
from model import MODELS, num_params
from runs import Ranks, RunError, job_dir, save_checkpoint, write_json

TEST_BATCH_SIZE = 1000  # evaluation only: no gradients, so bigger batches are just faster


# --------------------------------------------------------------------------- training


def train(model, trn_loader, device, criterion, optimizer, cuda_graph=True):
    """One epoch of training; returns (mean loss per sample, accuracy in [0, 1]) over every sample seen.

    A step only keeps its logits (detached) and labels; loss and accuracy are computed from them
    once, after the epoch, so the loop does no bookkeeping and never waits for the device. On CUDA
    the step is captured as a CUDA graph at the epoch's first batch and replayed for every batch
    of that size (``cuda_graph=False`` launches every kernel from Python instead).
    """
    model.train()
    step = functools.partial(sgd_step, model, criterion, optimizer)
    use_graph, graph = cuda_graph and device.type == "cuda", None
    outputs, targets = [], []
    for images, labels in trn_loader:
        if len(labels) == 1:  # BatchNorm cannot normalize a single sample in training mode
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if use_graph and graph is None:
            graph = GraphedStep(step, model, optimizer, images, labels)
        outputs.append(graph(images, labels) if graph is not None and graph.fits(images) else step(images, labels))
        targets.append(labels)
    return summarize(criterion, outputs, targets)


def sgd_step(model, criterion, optimizer, images, labels):
    """One SGD step on a batch; returns the batch's logits, detached."""
    logits = model(images)
    loss = criterion(logits, labels)  # mean over the batch
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return logits.detach()


class GraphedStep:
    """``step(images, labels)`` captured once as a CUDA graph, then replayed for each batch of the same shape.

    At batch 32 a step's kernels run for microseconds each, less than it takes Python to launch
    them one by one; a replay launches the whole step (forward, backward, SGD update) at once.
    Capturing needs a few warm-up steps first (they settle the optimizer's state and pick the
    kernels); their effect on the model, the optimizer and the CUDA RNG is undone, so training
    goes on exactly as if they had never run.
    """

    WARMUP_STEPS = 3

    def __init__(self, step, model, optimizer, images, labels):
        device = images.device
        self.images, self.labels = images.clone(), labels.clone()  # the graph reads its input from these
        for group in optimizer.param_groups:
            for p in group["params"] if group["momentum"] else ():
                # Zero buffers give the same first update as none (buf = momentum * 0 + grad), but exist
                # before the warm-up, so the graph captures the update with momentum.
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
        state = [*model.state_dict().values(), *(s["momentum_buffer"] for s in optimizer.state.values())]
        saved, saved_rng = [t.clone() for t in state], torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                step(self.images, self.labels)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.no_grad():
            for t, value in zip(state, saved, strict=True):
                t.copy_(value)
        torch.cuda.set_rng_state(saved_rng, device)
        optimizer.zero_grad()  # the graph's backward then allocates the gradients in the graph's memory
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.images, self.labels)

    def fits(self, images):
        return images.shape == self.images.shape

    def __call__(self, images, labels):
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites self.logits


@torch.inference_mode()
def test(model, tst_loader, device, criterion):
    """Evaluate; returns (mean loss per sample, accuracy in [0, 1]) over the whole loader."""
    model.eval()
    outputs, targets = [], []
    for images, labels in tst_loader:
        outputs.append(model(images.to(device, non_blocking=True)))
        targets.append(labels.to(device, non_blocking=True))
    return summarize(criterion, outputs, targets)


@torch.inference_mode()
def summarize(criterion, outputs, targets):
    """(mean loss per sample, accuracy) of the logits and labels of a whole epoch; the epoch's only host syncs.

    ``criterion`` averages over samples, so applied to all of them at once it gives the
    per-sample mean of the losses the steps saw, whatever the batch sizes. The accuracy is
    an exact count divided in Python: no float64 on the device, which MPS does not have.
    """
    logits, labels = torch.cat(outputs), torch.cat(targets)
    return criterion(logits, labels).item(), (logits.argmax(1) == labels).sum().item() / len(labels)


def device_arg(text):
    """--device: auto, cpu, cuda, cuda:N or mps."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def pick_device(name, local_rank=None):
    """The torch.device for --device; raises ValueError when the asked-for one is absent.

    With ``local_rank`` (under torchrun), ``auto`` and ``cuda`` mean GPU ``local_rank % device_count``,
    so the ranks of a machine share its GPUs evenly.
    """
    if name == "auto":
        problem = cuda_gpu_problem()
        if problem is None and torch.cuda.is_available():
            return pick_device("cuda", local_rank)
        if problem is not None:
            print(
                f"note: {problem}; training on the CPU. docs/platforms.md says what to install.",
                file=sys.stderr,
            )
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            problem = cuda_gpu_problem()
            raise ValueError(f"--device {name}: no CUDA device is available" + (f" ({problem})" if problem else ""))
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), from cuda:0"
            )
        if device.index is None and local_rank is not None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: no Apple MPS device is available")
    return device


def cuda_gpu_problem():
    """Why this torch cannot use the machine's NVIDIA GPU, or None (none installed, or all is well)."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        built = torch.cuda.get_arch_list()  # e.g. ['sm_75', ..., 'sm_120', 'compute_120']
        binary = any(arch == f"sm_{major}{m}" for arch in built for m in range(minor + 1))  # same major, older minor
        ptx = any(arch.startswith("compute_") and int(arch[8:]) <= major * 10 + minor for arch in built)
        if binary or ptx:
            return None
        name = torch.cuda.get_device_name()
        return f"the GPU {name} (sm_{major}{minor}) is older than any this torch was built for ({', '.join(built)})"
    if shutil.which("nvidia-smi") is None:  # every NVIDIA driver installs it, on Linux and Windows
        return None
    if torch.version.cuda is None:
        return "an NVIDIA GPU is installed, but this torch is a CPU-only build"
    return (
        f"an NVIDIA GPU is installed, but this torch (for CUDA {torch.version.cuda}) cannot use it (an older driver?)"
    )


def cpu_cores():
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name():
    """The processor's model name, for the record."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def epoch_seed(seed, epoch):
    """The RNG seed of one epoch: shuffling, dropout and augmentation depend only on (seed, epoch),
    so a run resumed at any epoch boundary repeats an uninterrupted one exactly."""
    return seed * 1_000_003 + epoch


def model_kwargs(name, cfg):
    """Constructor arguments of a model under this config (the ablation switches)."""
    if name == "lenet5_reg":
        return {"batchnorm": not cfg["no_batchnorm"], "dropout": cfg["dropout"]}
    return {}


def uses_augmentation(name, cfg):
    return name == "lenet5_reg" and not cfg["no_augment"]


# --------------------------------------------------------------------------- one model


def build(name, cfg, device):
    """The model, SGD optimizer and learning-rate schedule of one job under cfg (bench.py times these too)."""
    model = MODELS[name](**model_kwargs(name, cfg)).to(device, memory_format=MODELS[name].memory_format)
    sgd = functools.partial(
        torch.optim.SGD,
        list(model.parameters()),
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        weight_decay=cfg["weight_decay"],
    )
    try:
        optimizer = sgd(fused=device.type in ("cpu", "cuda"))  # one kernel for the whole update: measurably faster
    except (TypeError, RuntimeError):  # older torch: no fused SGD (before 2.3), or not on the CPU (before 2.4)
        optimizer = sgd()
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"])
        if cfg["lr_schedule"] == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    )
    return model, optimizer, scheduler


def run_job(name, seed, cfg, out, train_set, test_set, device, prefix="", val_set=None):
    """Train one model with one seed for cfg['epochs'], continuing from out/last.pt if present.

    Returns the number of epochs it trained (0 for a job that was already complete). Each epoch's
    line starts with ``prefix`` (the rank, under torchrun). With ``val_set`` each epoch is also
    evaluated on it (the validation split held out of the training images).
    """
    torch.manual_seed(seed)
    kwargs = model_kwargs(name, cfg)
    model, optimizer, scheduler = build(name, cfg, device)
    criterion = torch.nn.CrossEntropyLoss()
    stats = {"model": name, "params": num_params(model), "seed": seed, "kwargs": kwargs, "epochs": []}
    last, saved_stats = runs.saved_state(out, device)
    if last is not None:
        try:
            model.load_state_dict(last["model"])
            optimizer.load_state_dict(last["optimizer"])
            scheduler.load_state_dict(last["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunError(f"{out / 'last.pt'}: not a checkpoint of this job ({reason})") from None
        stats = saved_stats
    done = len(stats["epochs"])

    generator = torch.Generator()
    tst_loader = batch_loader(test_set, TEST_BATCH_SIZE)
    val_loader = batch_loader(val_set, TEST_BATCH_SIZE) if val_set is not None else None
    show_bar = sys.stdout.isatty() and not cfg["quiet"] and not prefix  # several ranks' bars would garble

    for epoch in range(len(stats["epochs"]) + 1, cfg["epochs"] + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        torch.manual_seed(epoch_seed(seed, epoch))
        generator.manual_seed(epoch_seed(seed, epoch))
        epoch_set = train_set.distorted() if uses_augmentation(name, cfg) else train_set
        trn_loader = batch_loader(epoch_set, cfg["batch_size"], generator)
        bar = tqdm(
            trn_loader, desc=f"{name} {epoch}/{cfg['epochs']}", leave=False, disable=not show_bar, mininterval=0.5
        )
        train_loss, train_acc = train(model, bar, device, criterion, optimizer)
        test_loss, test_acc = test(model, tst_loader, device, criterion)
        val = dict(zip(("val_loss", "val_acc"), test(model, val_loader, device, criterion))) if val_loader else {}
        scheduler.step()
        seconds = time.perf_counter() - start
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            **val,
            "lr": lr,
            "seconds": seconds,
        }
        stats["epochs"].append(row)
        write_json(out / "stats.json", stats)
        # last.pt is written last: it marks the epoch complete (resuming trims stats to its epoch).
        save_checkpoint(
            out / "last.pt",
            {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
        )
        val_text = f" | val loss {val['val_loss']:.4f} acc {val['val_acc']:7.2%}" if val else ""
        print(
            f"{prefix}{name:<10} seed {seed} epoch {epoch:>{len(str(cfg['epochs']))}}/{cfg['epochs']}"
            f" | train loss {train_loss:.4f} acc {train_acc:7.2%}{val_text}"
            f" | test loss {test_loss:.4f} acc {test_acc:7.2%} | {seconds:5.1f} s",
            flush=True,
        )
    return len(stats["epochs"]) - done


# --------------------------------------------------------------------------- CLI


def number(kind, description, low=None):
    """An argparse type: ``kind`` (int or float), greater than ``low`` when given; errors name what is expected."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not math.isfinite(value):  # float("inf") and float("nan") parse, and would train into NaN rows
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and not value > low:
            raise argparse.ArgumentTypeError(f"must be greater than {low}, got {text}")
        return value

    return parse


WHOLE, POSITIVE_WHOLE = number(int, "a whole number"), number(int, "a whole number greater than 0", 0)
DECIMAL, POSITIVE_DECIMAL = number(float, "a number"), number(float, "a number greater than 0", 0)


def model_list(text):
    names = list(MODELS) if text == "all" else [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)} or all")
    return once_each(names, "model")


def once_each(values, what):
    """``values``, refused when one is repeated: a job named twice would train twice into one folder."""
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{what} {', '.join(repeated)} given more than once")
    return values


def seed_list(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    return once_each(seeds, "seed")


def run_name(text):
    if not text or text in (".", "..", runs.LATEST) or any(sep in text for sep in "/\\"):
        raise argparse.ArgumentTypeError(f"expected a folder name (no slashes, not '{runs.LATEST}'), got {text!r}")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the module docstring as written and each option's default, where it has one: not
    for a flag (off unless given) or an option that is unset unless given."""

    def _get_help_string(self, action):  # the hook ArgumentDefaultsHelpFormatter itself overrides
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# Options that say where and how to run, not what: the only ones --resume takes besides itself.
RESUME_OPTIONS = {"resume", "data_dir", "idx_dir", "device", "threads", "quiet"}


def build_parser():
    p = argparse.ArgumentParser(prog="main.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", type=model_list, default="all", help=f"{', '.join(MODELS)}, a comma list, or all")
    p.add_argument("--epochs", type=POSITIVE_WHOLE, default=10, help="training epochs per model")
    p.add_argument("--batch-size", type=POSITIVE_WHOLE, default=32, help="training batch size")
    p.add_argument("--lr", type=POSITIVE_DECIMAL, default=0.01, help="initial SGD learning rate")
    p.add_argument("--momentum", type=DECIMAL, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=DECIMAL, default=5e-4, help="SGD weight decay (L2)")
    p.add_argument(
        "--lr-schedule", choices=("cosine", "constant"), default="cosine", help="learning rate over the epochs"
    )
    p.add_argument("--seed", type=WHOLE, default=0, help="random seed (initialization, shuffling, dropout)")
    p.add_argument("--seeds", type=seed_list, help="comma list of seeds: each model once per seed, in seed<k>/")
    p.add_argument("--dropout", type=DECIMAL, default=0.0, help="dropout rate of lenet5_reg (ablation: 0.25)")
    p.add_argument("--no-batchnorm", action="store_true", help="lenet5_reg without BatchNorm (ablation)")
    p.add_argument("--no-augment", action="store_true", help="lenet5_reg without data augmentation (ablation)")
    p.add_argument("--device", type=device_arg, default="auto", help="where to train: auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--threads",
        type=POSITIVE_WHOLE,
        help="CPU threads per process; default: torch's own, under torchrun the cores over the processes",
    )
    p.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="folder of train.tar and test.tar, or train/ and test/"
    )
    p.add_argument("--idx-dir", type=Path, help="folder with the four IDX files, to build missing tars from")
    p.add_argument("--out-dir", type=Path, default=Path("runs"), help="folder of the runs")
    p.add_argument("--run-name", type=run_name, help="name of this run's folder; the time when not given")
    p.add_argument("--train-limit", type=POSITIVE_WHOLE, help="use only the first N training images")
    p.add_argument("--test-limit", type=POSITIVE_WHOLE, help="use only the first N test images")
    p.add_argument(
        "--val-size", type=WHOLE, default=0, help="hold out the last N training images as a validation split"
    )
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run with its saved settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def given_options(argv):
    """The names of the options that ``argv`` sets, whatever their values (no option can be set to None)."""
    probe = build_parser()
    probe.set_defaults(**dict.fromkeys(vars(probe.parse_args([])), None))
    return {name for name, value in vars(probe.parse_args(argv)).items() if value is not None}


def parse_args(argv=None, ranks=None):
    """The parsed options, checked, with ``args.device`` a torch.device (that of its rank under torchrun)."""
    ranks = ranks or Ranks()
    p = build_parser()
    args = p.parse_args(argv)
    if args.resume is not None:
        given = given_options(argv)
        changed = sorted(given - RESUME_OPTIONS)
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            p.error(
                f"argument {flag}: --resume continues a run with its own settings, so it takes only "
                "--data-dir, --idx-dir, --device, --threads and --quiet; start a new run to change the others"
            )
        try:
            args.resume = runs.find_run(args.resume)
        except RunError as e:
            p.error(f"argument --resume: {e}")
        if not (args.resume / "config.json").is_file():
            p.error(f"argument --resume: {args.resume} is not a run directory (no config.json)")
        if "data_dir" not in given:
            args.data_dir = None  # the run's own
    elif args.run_name is not None and (args.out_dir / args.run_name).exists():
        where = args.out_dir / args.run_name
        p.error(
            f"argument --run-name: {where} already exists; continue it with "
            f"{runs.command('python', 'main.py', '--resume', where)}, or pick another name"
        )
    if not 0 <= args.dropout < 1:
        p.error(f"argument --dropout: must be in [0, 1), got {args.dropout}")
    if not 0 <= args.momentum < 1:
        p.error(f"argument --momentum: must be in [0, 1), got {args.momentum}")
    if args.weight_decay < 0:
        p.error(f"argument --weight-decay: must be 0 or more, got {args.weight_decay}")
    if min(args.batch_size, args.train_limit or args.batch_size) == 1:  # train() would see no batch it can use
        flag = "--batch-size" if args.batch_size == 1 else "--train-limit"
        p.error(f"argument {flag}: must be at least 2 (a batch of one image is skipped: BatchNorm needs two)")
    if args.val_size < 0:  # too large for the training set: start_run says so, once the set is loaded
        p.error(f"argument --val-size: must be 0 or more, got {args.val_size}")
    try:
        args.device = pick_device(args.device, ranks.local_rank if ranks.spread else None)
    except ValueError as e:
        p.error(str(e))
    return args


def load_config(args):
    """(run folder, or None for a new run; settings): from the command line, or config.json when resuming.

    The data folder is kept as an absolute path, so --resume and plot.py find it from any folder.
    """
    if args.resume is not None:
        cfg = runs.read_config(args.resume)
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


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """SIGTERM ends a run the way Ctrl-C does (completed epochs are on disk); the handler that was there
    before comes back afterwards, so a notebook that calls main() is left as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=()):
    """The command line; ``main()`` from a notebook runs the defaults (``python main.py`` passes its arguments).

    Under torchrun each rank runs this: rank 0 prepares the data and makes the run folder, then every
    rank trains the jobs it takes from the shared queue, and rank 0 prints the run's table at the end.
    """
    ranks = Ranks.from_env()
    args = parse_args(list(argv), ranks)
    threads = args.threads or (max(1, cpu_cores() // ranks.local_world_size) if ranks.spread else None)
    torch_threads = torch.get_num_threads()
    try:
        ranks.connect()
    except (RuntimeError, ValueError) as e:  # torch.distributed's errors on a failed rendezvous
        print(f"error: cannot reach the other torchrun processes ({str(e).splitlines()[0]})", file=sys.stderr)
        return 1
    if threads:
        torch.set_num_threads(threads)
    try:
        with sigterm_as_ctrl_c():
            return start_run(args, ranks)
    finally:
        torch.set_num_threads(torch_threads)  # as it was, for a notebook that calls main() again


def start_run(args, ranks):
    """Load the data and find or make the run folder (rank 0 first; the others follow), then train."""
    say = ranks.prefix
    try:
        run_dir, cfg = load_config(args)
    except RunError as e:
        print(f"{say}error: {e}", file=sys.stderr)
        return 1
    device = args.device
    # Where and how this launch runs: a new run's config.json holds it at the top, and a resume adds it
    # to the run's "resumes", leaving the record of how the run was made as it was.
    launch = dict(when=time.strftime("%Y-%m-%d %H:%M:%S %z"), device=str(device), threads=torch.get_num_threads(),
                  cpu=cpu_name(), torch=torch.__version__, python=platform.python_version(),
                  world_size=ranks.world_size)  # fmt: skip
    cfg.update(launch)
    processes = ranks.gather("rank", ranks.record(device, cfg["threads"]))  # before any slow step
    if ranks.spread:
        launch["ranks"] = cfg["ranks"] = processes
    if run_dir is None:  # what rank 0 writes to config.json
        saved = cfg
    else:
        saved = {**runs.read_json(run_dir / "config.json"), **runs.where_data(cfg)}
        saved["resumes"] = [*saved.get("resumes", []), launch]
    if ranks.rank != 0:
        try:
            run_dir = Path(ranks.wait("run folder"))
        except KeyboardInterrupt:
            print(f"{say}interrupted before training", file=sys.stderr)
            return 130
        except runs.RanksLost:  # rank 0 has ended, and said why
            return 1
        if run_dir == Path():  # rank 0 could not start the run, and said why
            return 1
        try:
            cfg = runs.read_config(run_dir)
        except RunError as e:
            print(f"{say}error: {e}; every machine must see --out-dir at the same path", file=sys.stderr)
            return 1
    try:
        train_set, test_set = load_splits(
            args.data_dir or cfg["data_dir"], cfg["idx_dir"], device, cfg["train_limit"], cfg["test_limit"]
        )
    except KeyboardInterrupt:
        print(f"\n{say}interrupted before training" + ("" if ranks.rank else ": no run was written"), file=sys.stderr)
        return 130
    except DatasetError as e:
        print(f"{say}error: {e}", file=sys.stderr)
        code = 1
    else:
        code = None
        if cfg["val_size"] > len(train_set) - 2:
            print(f"{say}error: --val-size {cfg['val_size']} leaves fewer than 2 of the {len(train_set)} "
                  "training images to train on", file=sys.stderr)  # fmt: skip
            code = 1
    if ranks.rank == 0:
        if code is None:
            try:
                if run_dir is None:  # the folder appears only now, with the data ready
                    run_dir = runs.create_run_dir(args.out_dir, args.run_name)
                    cfg["run_name"] = run_dir.name
                write_json(run_dir / "config.json", saved)
                runs.point_latest(run_dir)
            except OSError as e:
                where = e.filename or args.out_dir
                print(f"{say}error: {where}: cannot write the run there ({e.strerror})", file=sys.stderr)
                code = 1
        if ranks.spread:
            ranks.share("run folder", "" if code else str(run_dir))
    if code:
        return code
    return train_all(run_dir, cfg, train_set, test_set, device, ranks)


def train_all(run_dir, cfg, train_set, test_set, device, ranks=None):
    """Train what is left of the run's jobs (those this rank takes, under torchrun), then print the
    run's table (rank 0, once every rank is done); returns the exit code.

    A job whose files are damaged is reported and left as it is; the others still train.
    """
    ranks = ranks or Ranks()
    say, resume = ranks.prefix, ranks.resume_command(run_dir)
    threads = f", {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}" if device.type == "cpu" else ""
    print(f"{say}run {run_dir} on {device}{threads}", flush=True)
    todo = runs.jobs(cfg, slowest_first=ranks.spread)
    train_set, val_set = train_set.held_out(cfg["val_size"])
    trained, failed = 0, 0
    try:
        for index in ranks.take(len(todo)):
            name, seed = todo[index]
            out = job_dir(run_dir, name, seed, cfg["per_seed"])
            try:
                trained += run_job(name, seed, cfg, out, train_set, test_set, device, say, val_set)
            except RunError as e:
                print(f"{say}error: {e}; move {out} away to train {name} seed {seed} from scratch", file=sys.stderr)
                failed += 1
        trained, failed = ranks.finish(trained, failed)
    except OSError as e:  # a full disk, say: every completed epoch is still on disk
        print(f"{say}error: {e.filename or run_dir}: {e.strerror}; completed epochs are saved: fix that, then {resume}",
              file=sys.stderr)  # fmt: skip
        return 1
    except NotImplementedError as e:  # an operation this torch lacks on this device (MPS)
        print(f"{say}error: {device}: {str(e).splitlines()[0]}; try --device cpu or a newer torch", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, runs.RanksLost):  # Ctrl-C or SIGTERM (from torchrun, when another rank failed)
        if ranks.first_to_stop():
            print(f"\n{say}interrupted: completed epochs are saved; continue with: {resume}", flush=True)
        else:
            print(f"{say}interrupted: completed epochs are saved", flush=True)
        return 130
    if ranks.rank != 0:  # a failed job is in its own line; rank 0's exit code counts it (a non-zero exit
        return 0  # here would make torchrun stop the ranks still training)
    if not trained and not failed:
        print("every job was already complete: nothing left to train")
    print("\n" + runs.summary(run_dir, cfg))
    print(f"\nplot it: {runs.command('python', 'plot.py', run_dir)}")
    return 1 if failed else 0


if __name__ == "__main__":
    safe_console()
    sys.exit(main(sys.argv[1:]))
