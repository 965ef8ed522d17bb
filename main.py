"""Train and test LeNet-5, CustomMLP and the regularized LeNet-5 on MNIST.

    python main.py                                   # all three models, 10 epochs each
    python main.py --model lenet5 --epochs 1         # one model, one epoch
    python main.py --seeds 0,1,2                     # every model once per seed
    python main.py --resume runs/20261128-130000     # continue an interrupted run

Each run writes RUN_DIR/config.json and, per model (and per seed with --seeds),
stats.json, last.pt and best.pt, all rewritten atomically after every epoch.
"""

import argparse
import functools
import json
import platform
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dataset import MNIST, DatasetError, atomic_open, batch_loader, ensure_tars
from model import MODELS, num_params

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
    per-sample mean of the losses the steps saw, whatever the batch sizes.
    """
    logits, labels = torch.cat(outputs), torch.cat(targets)
    return criterion(logits, labels).item(), (logits.argmax(1) == labels).double().mean().item()


def pick_device(name):
    """The torch.device for --device; raises ValueError when the asked-for one is absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: no Apple MPS device is available")
    return torch.device(name)


def cpu_name():
    """The processor's model name, for the record."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def epoch_seed(seed, epoch):
    """The RNG seed of one epoch: shuffling, dropout and augmentation depend only on (seed, epoch),
    so a run resumed at any epoch boundary repeats an uninterrupted one exactly."""
    return seed * 1_000_003 + epoch


# --------------------------------------------------------------------------- files


def write_json(path, obj):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def save_checkpoint(path, obj):
    with atomic_open(path) as f:
        torch.save(obj, f)


def point_latest(run_dir):
    """Make OUT_DIR/latest a symlink to the run, replaced atomically."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{run_dir.name}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    tmp.replace(link)


def job_dir(run_dir, model_name, seed, per_seed):
    return run_dir / model_name / f"seed{seed}" if per_seed else run_dir / model_name


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
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        weight_decay=cfg["weight_decay"],
        fused=device.type in ("cpu", "cuda"),  # one kernel for the whole update: measurably faster
    )
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"])
        if cfg["lr_schedule"] == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    )
    return model, optimizer, scheduler


def run_job(name, seed, cfg, out, train_set, test_set, device):
    """Train one model with one seed for cfg['epochs'], continuing from out/last.pt if present."""
    torch.manual_seed(seed)
    kwargs = model_kwargs(name, cfg)
    model, optimizer, scheduler = build(name, cfg, device)
    criterion = torch.nn.CrossEntropyLoss()
    stats = {"model": name, "params": num_params(model), "seed": seed, "kwargs": kwargs, "epochs": []}
    if (out / "last.pt").exists():
        last = torch.load(out / "last.pt", map_location=device, weights_only=True)
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        stats = json.loads((out / "stats.json").read_text())
        del stats["epochs"][last["epoch"] :]  # a row written just before a kill, without its checkpoint
    best_acc = max((e["test_acc"] for e in stats["epochs"]), default=-1.0)

    generator = torch.Generator()
    trn_loader = batch_loader(train_set.with_augment(uses_augmentation(name, cfg)), cfg["batch_size"], generator)
    tst_loader = batch_loader(test_set, TEST_BATCH_SIZE)
    show_bar = sys.stdout.isatty() and not cfg["quiet"]

    for epoch in range(len(stats["epochs"]) + 1, cfg["epochs"] + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        torch.manual_seed(epoch_seed(seed, epoch))
        generator.manual_seed(epoch_seed(seed, epoch))
        bar = tqdm(trn_loader, desc=f"{name} {epoch}/{cfg['epochs']}", leave=False, disable=not show_bar)
        train_loss, train_acc = train(model, bar, device, criterion, optimizer)
        test_loss, test_acc = test(model, tst_loader, device, criterion)
        scheduler.step()
        seconds = time.perf_counter() - start
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": lr,
            "seconds": seconds,
        }
        stats["epochs"].append(row)
        write_json(out / "stats.json", stats)
        if test_acc > best_acc:
            best_acc = test_acc
            save_checkpoint(
                out / "best.pt",
                {"epoch": epoch, "test_acc": test_acc, "name": name, "kwargs": kwargs, "model": model.state_dict()},
            )
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
        print(
            f"{name:<10} seed {seed} epoch {epoch:>{len(str(cfg['epochs']))}}/{cfg['epochs']}"
            f" | train loss {train_loss:.4f} acc {train_acc:7.2%}"
            f" | test loss {test_loss:.4f} acc {test_acc:7.2%} | {seconds:5.1f} s",
            flush=True,
        )
    return stats


# --------------------------------------------------------------------------- CLI


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def model_list(text):
    names = list(MODELS) if text == "all" else [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown)}; choose from {', '.join(MODELS)} or all")
    return names


def seed_list(text):
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text}") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the module docstring as written and each option's default."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="main.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", type=model_list, default="all", help=f"{', '.join(MODELS)}, a comma list, or all")
    p.add_argument("--epochs", type=positive(int), default=10, help="training epochs per model")
    p.add_argument("--batch-size", type=positive(int), default=32, help="training batch size")
    p.add_argument("--lr", type=positive(float), default=0.01, help="initial SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (L2)")
    p.add_argument(
        "--lr-schedule", choices=("cosine", "constant"), default="cosine", help="learning rate over the epochs"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (initialization, shuffling, dropout)")
    p.add_argument("--seeds", type=seed_list, help="comma list of seeds: each model once per seed, in seed<k>/")
    p.add_argument("--dropout", type=float, default=0.25, help="dropout rate of lenet5_reg (0 turns it off)")
    p.add_argument("--no-batchnorm", action="store_true", help="lenet5_reg without BatchNorm (ablation)")
    p.add_argument("--no-augment", action="store_true", help="lenet5_reg without data augmentation (ablation)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to train")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="folder of train.tar and test.tar")
    p.add_argument("--idx-dir", type=Path, help="folder with the four IDX files, to build missing tars from")
    p.add_argument("--out-dir", type=Path, default=Path("runs"), help="folder of the runs")
    p.add_argument("--run-name", help="name of this run's folder; a timestamp when not given")
    p.add_argument("--train-limit", type=positive(int), help="use only the first N training images")
    p.add_argument("--test-limit", type=positive(int), help="use only the first N test images")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run with its saved settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 0 <= args.dropout < 1:
        p.error(f"argument --dropout: must be in [0, 1), got {args.dropout}")
    if min(args.batch_size, args.train_limit or args.batch_size) == 1:  # train() would see no batch it can use
        flag = "--batch-size" if args.batch_size == 1 else "--train-limit"
        p.error(f"argument {flag}: must be at least 2 (a batch of one image is skipped: BatchNorm needs two)")
    try:
        args.device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.resume is not None and not (args.resume / "config.json").is_file():
        p.error(f"argument --resume: {args.resume} is not a run directory (no config.json)")
    return args


def load_config(args):
    """The run's settings: from the command line, or from config.json when resuming."""
    if args.resume is not None:
        try:
            cfg = json.loads((args.resume / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{args.resume / 'config.json'}: cannot read it ({e})") from None
        cfg.update(resume=str(args.resume), quiet=args.quiet)  # all else as the run started
        return args.resume.resolve(), cfg  # runs/latest names the run it links to
    cfg = {k: v for k, v in vars(args).items() if k != "device"}
    cfg = json.loads(json.dumps(cfg, default=str))  # Paths as strings
    cfg["run_name"] = args.run_name or time.strftime("%Y%m%d-%H%M%S")
    cfg["seeds"] = args.seeds or [args.seed]
    cfg["per_seed"] = args.seeds is not None
    return args.out_dir / cfg["run_name"], cfg


def main(argv=None):
    args = parse_args(argv)
    try:
        run_dir, cfg = load_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = args.device
    cfg.update(
        device=str(device),
        threads=torch.get_num_threads(),
        cpu=cpu_name(),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    # SIGTERM ends the run the way Ctrl-C does: completed epochs are already on disk.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        train_tar, test_tar = ensure_tars(cfg["data_dir"], cfg["idx_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", cfg)
        point_latest(run_dir)
        print(f"run {run_dir} on {device}", flush=True)
        train_set = MNIST(train_tar, limit=cfg["train_limit"]).to(device)
        test_set = MNIST(test_tar, limit=cfg["test_limit"]).to(device)
        for seed in cfg["seeds"]:
            for name in cfg["model"]:
                out = job_dir(run_dir, name, seed, cfg["per_seed"])
                run_job(name, seed, cfg, out, train_set, test_set, device)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. an output folder that cannot be written
        print(f"error: {e.filename or run_dir}: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed epochs are saved; continue with: python main.py --resume {run_dir}")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
