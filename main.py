"""Train and test LeNet-5, CustomMLP and the regularized LeNet-5 on MNIST.

    python main.py                                  # all three models, 10 epochs each
    python main.py --model lenet5 --epochs 1        # one model, one epoch
    python main.py --seeds 0,1,2                    # every model once per seed
    python main.py --resume runs/20261128-130000    # continue an interrupted run
    torchrun --standalone --nproc-per-node=2 main.py --seeds 0,1,2    # over 2 processes

Each run writes RUN_DIR/config.json and, per model (and per seed with --seeds), stats.json and
last.pt (the model after its last completed epoch), rewritten atomically after every epoch, then
rule.pt (outliers.py: what the model takes for a digit). The last training images are held out
(--val-size): the rule is fitted on them, and each epoch reports their accuracy beside the test's.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import exposure
import machine
import outliers
import runs
from cli import DECIMAL, POSITIVE_DECIMAL, POSITIVE_WHOLE, WHOLE
from dataset import TEST_BATCH_SIZE, batch_loader
from distortions import PARTS
from model import DROPOUT, MODELS, num_params
from ranks import Ranks, RanksLost
from runs import RunError, job_dir

# ------------------------------------------------------------ training


def train(model, trn_loader, device, criterion, optimizer, cuda_graph=True):
    """One epoch of training: (mean loss per sample, accuracy in [0, 1]) over the samples it saw.

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
            graph = machine.GraphedStep(step, model, optimizer, images, labels)
        outputs.append(
            graph(images, labels)
            if graph is not None and graph.fits(images)
            else step(images, labels)
        )
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
    """(mean loss per sample, accuracy) of a whole epoch's logits and labels: its only host syncs.

    ``criterion`` averages over samples, so applied to all of them at once it gives the
    per-sample mean of the losses the steps saw, whatever the batch sizes. The accuracy is
    an exact count divided in Python: no float64 on the device, which MPS does not have.
    """
    logits, labels = torch.cat(outputs), torch.cat(targets)
    right, digits = (logits.argmax(1) == labels).sum().item(), (labels >= 0).sum().item()
    return criterion(logits, labels).item(), right / digits  # non-digits (exposure.py) not counted


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


def uses_non_digits(name, cfg):
    return name == "lenet5_reg" and bool(cfg["non_digits"])


def epoch_split(name, cfg, train_set):
    """One epoch's training set: lenet5_reg's distorted anew, with its non-digits (exposure.py)."""
    augment = uses_augmentation(name, cfg)
    split = train_set.distorted(cfg["augment_without"]) if augment else train_set
    if uses_non_digits(name, cfg):
        used, share = cfg["non_digits"], cfg["non_digit_share"]
        split = exposure.exposed(split, used, share, cfg["augment_without"], augment)
    return split


def loss(name, cfg):
    return exposure.ExposureLoss() if uses_non_digits(name, cfg) else torch.nn.CrossEntropyLoss()


# ------------------------------------------------------------ one model


def build(name, cfg, device):
    """The model, SGD optimizer and learning-rate schedule of a job (bench.py times these too)."""
    model = MODELS[name](**model_kwargs(name, cfg)).to(
        device, memory_format=MODELS[name].memory_format
    )
    sgd = functools.partial(
        torch.optim.SGD,
        list(model.parameters()),
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        weight_decay=cfg["weight_decay"],
    )
    try:
        # one kernel for the whole update (docs/performance.md)
        optimizer = sgd(fused=device.type in ("cpu", "cuda"))
    # older torch: no fused SGD (before 2.3), or not on the CPU (before 2.4)
    except (TypeError, RuntimeError):
        optimizer = sgd()
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"])
        if cfg["lr_schedule"] == "cosine"
        else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    )
    return model, optimizer, scheduler


def run_job(name, seed, cfg, out, train_set, test_set, device, prefix="", val_set=None):
    """Train one model with one seed for cfg['epochs'], continuing from out/last.pt if present, then
    fit its not-a-digit rule (outliers.write_rule); returns the epochs it trained (0 for a job
    already complete). Each epoch's line starts with ``prefix`` (the rank, under torchrun) and gives
    the accuracy on ``val_set`` (the validation split), if any."""
    model, optimizer, scheduler, stats = start_job(name, seed, cfg, out, device)
    criterion = loss(name, cfg)
    done = len(stats["epochs"])

    generator = torch.Generator()
    tst_loader = batch_loader(test_set, TEST_BATCH_SIZE)
    val_loader = batch_loader(val_set, TEST_BATCH_SIZE) if val_set is not None else None
    # several ranks' bars would garble each other
    show_bar = sys.stdout.isatty() and not cfg["quiet"] and not prefix

    for epoch in range(done + 1, cfg["epochs"] + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        torch.manual_seed(epoch_seed(seed, epoch))
        generator.manual_seed(epoch_seed(seed, epoch))
        epoch_set = epoch_split(name, cfg, train_set)
        trn_loader = batch_loader(epoch_set, cfg["batch_size"], generator)
        title = f"{name} {epoch}/{cfg['epochs']}"
        bar = tqdm(trn_loader, desc=title, leave=False, disable=not show_bar, mininterval=0.5)
        train_loss, train_acc = train(model, bar, device, criterion, optimizer)
        test_loss, test_acc = test(model, tst_loader, device, criterion)
        val = {}
        if val_loader:
            val_loss, val_acc = test(model, val_loader, device, criterion)
            val = {"val_loss": val_loss, "val_acc": val_acc}
        scheduler.step()
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            **val,
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        stats["epochs"].append(row)
        runs.save_epoch(out, stats, model, optimizer, scheduler)
        print(prefix + runs.epoch_line(name, seed, cfg["epochs"], row), flush=True)
    if not (out / outliers.RULE).is_file():  # and a job trained before rules were: it gets one
        outliers.write_rule(out, model, train_set, val_set)
    return len(stats["epochs"]) - done


def start_job(name, seed, cfg, out, device):
    """The model, optimizer, schedule and stats of a job: new, or as out/last.pt left them."""
    torch.manual_seed(seed)
    model, optimizer, scheduler = build(name, cfg, device)
    last, stats = runs.saved_state(out, device)
    if last is None:
        kwargs = model_kwargs(name, cfg)
        stats = {"model": name, "params": num_params(model), "seed": seed, "kwargs": kwargs}
        stats["epochs"] = []
    else:
        parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        runs.restore(out / "last.pt", last, "this job", **parts)
    return model, optimizer, scheduler, stats


# ------------------------------------------------------------ CLI


def model_list(text):
    return list(MODELS) if text == "all" else cli.names(text, "model", MODELS, " or all")


def source_list(text):
    return [] if text == "none" else cli.names(text, "source", exposure.SOURCES, " or none")


def seed_list(text):
    return cli.comma_list(text, "seed", int, "comma-separated whole numbers")


def run_name(text):
    if not text or text in (".", "..", runs.LATEST) or any(sep in text for sep in "/\\"):
        raise argparse.ArgumentTypeError(
            f"expected a folder name (no slashes, not '{runs.LATEST}'), got {text!r}"
        )
    return text


# Options that say where and how to run, not what: the only ones --resume takes besides itself.
RESUME_OPTIONS = {"resume", "data_dir", "idx_dir", "device", "threads", "quiet"}


def build_parser():
    p = cli.parser("main.py", __doc__)
    add_experiment_options(p)
    add_run_options(p)
    return p


def add_experiment_options(p):
    """What is trained: the models, the recipe, the seeds and the ablations."""
    add = p.add_argument
    add(
        "--model", type=model_list, default="all", help=f"{', '.join(MODELS)}, a comma list, or all"
    )
    add("--epochs", type=POSITIVE_WHOLE, default=10, help="training epochs per model")
    add("--batch-size", type=POSITIVE_WHOLE, default=32, help="training batch size")
    add("--lr", type=POSITIVE_DECIMAL, default=0.01, help="initial SGD learning rate")
    add("--momentum", type=DECIMAL, default=0.9, help="SGD momentum")
    add("--weight-decay", type=DECIMAL, default=5e-4, help="SGD weight decay (L2)")
    schedules = ("cosine", "constant")
    add("--lr-schedule", choices=schedules, default="cosine", help="learning rate over the epochs")
    add("--seed", type=WHOLE, default=0, help="random seed (initialization, shuffling, dropout)")
    add(
        "--seeds", type=seed_list, help="comma list of seeds: each model once per seed, in seed<k>/"
    )
    add("--dropout", type=DECIMAL, default=DROPOUT, help="dropout rate of lenet5_reg (ablation: 0)")
    add("--no-batchnorm", action="store_true", help="lenet5_reg without BatchNorm (ablation)")
    add("--no-augment", action="store_true", help="lenet5_reg without data augmentation (ablation)")
    parts = f"lenet5_reg's augmentation without these parts (ablation): {', '.join(PARTS)}"
    part_list = functools.partial(cli.names, what="part", known=PARTS)
    add("--augment-without", type=part_list, default=[], metavar="PARTS", help=parts)
    sources = f"lenet5_reg's non-digits: {', '.join(exposure.SOURCES)}, or none (ablation)"
    add("--non-digits", type=source_list, default=exposure.sources(), help=sources)
    share = "lenet5_reg's non-digits per training digit, each epoch"
    add("--non-digit-share", type=POSITIVE_DECIMAL, default=exposure.SHARE, help=share)


def add_run_options(p):
    """Where and how: the device, the data, the folders, the share of the data, resuming."""
    add = p.add_argument
    devices = "where to train: auto, cpu, cuda, cuda:N or mps"
    add("--device", type=machine.device_arg, default="auto", help=devices)
    threads = "CPU threads per process; unset, torch's own, under torchrun the cores per process"
    add("--threads", type=POSITIVE_WHOLE, help=threads)
    data = "folder of train.tar and test.tar, or train/ and test/"
    add("--data-dir", type=Path, default=Path("data"), help=data)
    add("--idx-dir", type=Path, help="folder with the four IDX files, to build missing tars from")
    add("--out-dir", type=Path, default=Path("runs"), help="folder of the runs")
    add("--run-name", type=run_name, help="name of this run's folder; the time when not given")
    add("--train-limit", type=POSITIVE_WHOLE, help="use only the first N training images")
    add("--test-limit", type=POSITIVE_WHOLE, help="use only the first N test images")
    val = f"hold out the last N training images (unset: {runs.VAL_SIZE:,}, or a tenth of fewer)"
    add("--val-size", type=WHOLE, help=val + ": the validation split, which the rule is fitted on")
    add("--resume", type=Path, metavar="RUN_DIR", help="continue this run with its saved settings")
    add("--quiet", action="store_true", help="no progress bar")


def given_options(argv):
    """The names of the options ``argv`` sets, whatever their values (none can be set to None)."""
    probe = build_parser()
    probe.set_defaults(**dict.fromkeys(vars(probe.parse_args([])), None))
    return {name for name, value in vars(probe.parse_args(argv)).items() if value is not None}


def parse_args(argv=None, ranks=None):
    """The options, checked; ``args.device`` a torch.device (its rank's, under torchrun)."""
    ranks = ranks or Ranks()
    argv = cli.arguments(argv)
    p = build_parser()
    args = p.parse_args(argv)
    if args.resume is not None:
        given = given_options(argv)
        changed = sorted(given - RESUME_OPTIONS)
        if changed:
            flag = "--" + changed[0].replace("_", "-")
            p.error(
                f"argument {flag}: --resume continues a run with its own settings, so it takes"
                " only --data-dir, --idx-dir, --device, --threads and --quiet; start a new run to"
                " change the others"
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
            f"{cli.command('python', 'main.py', '--resume', where)}, or pick another name"
        )
    if not 0 <= args.dropout < 1:
        p.error(f"argument --dropout: must be in [0, 1), got {args.dropout}")
    if not 0 <= args.momentum < 1:
        p.error(f"argument --momentum: must be in [0, 1), got {args.momentum}")
    if args.weight_decay < 0:
        p.error(f"argument --weight-decay: must be 0 or more, got {args.weight_decay}")
    # train() would see no batch it can use
    if min(args.batch_size, args.train_limit or args.batch_size) == 1:
        flag = "--batch-size" if args.batch_size == 1 else "--train-limit"
        p.error(
            f"argument {flag}: must be at least 2"
            " (a batch of one image is skipped: BatchNorm needs two)"
        )
    # too large for the training set: start_run says so, once the set is loaded
    if args.val_size is not None and args.val_size < 0:
        p.error(f"argument --val-size: must be 0 or more, got {args.val_size}")
    try:
        args.device = machine.pick_device(args.device, ranks.local_rank if ranks.several else None)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    """The command line; ``main()`` from a notebook runs the defaults, ``python main.py`` its argv.

    Under torchrun each rank runs this: rank 0 prepares the data and makes the run folder, then
    every rank trains the jobs it takes from the shared queue, and rank 0 prints the run's table at
    the end.
    """
    ranks = Ranks.from_env()
    args = parse_args(argv, ranks)
    threads = args.threads
    if threads is None and ranks.several:
        threads = max(1, machine.cpu_cores() // ranks.local_world_size)
    torch_threads = torch.get_num_threads()
    try:
        ranks.connect()
    # torch.distributed's errors on a failed rendezvous
    except (RuntimeError, ValueError) as e:
        cli.error(f"cannot reach the other torchrun processes ({cli.first_line(e)})")
        return 1
    if threads:
        torch.set_num_threads(threads)
    try:
        with cli.sigterm_as_ctrl_c():
            return start_run(args, ranks)
    finally:
        # as it was, for a notebook that calls main() again
        torch.set_num_threads(torch_threads)


def start_run(args, ranks):
    """Load the data, find or make the run folder (rank 0 first, then the others), and train."""
    prefix = ranks.prefix
    try:
        run_dir, cfg = runs.load_config(args)
    except RunError as e:
        cli.error(e, prefix)
        return 1
    saved = runs.record_launch(run_dir, cfg, args.device, ranks)
    if ranks.rank != 0:
        try:
            run_dir = ranks.run_folder()
        except KeyboardInterrupt:
            print(f"{prefix}interrupted before training", file=sys.stderr)
            return 130
        if run_dir is None:
            return 1
        try:
            cfg = runs.read_config(run_dir)
        except RunError as e:
            cli.error(f"{e}; every machine must see --out-dir at the same path", prefix)
            return 1
    try:
        train_set, test_set = runs.load_data(args, cfg, prefix)
    except KeyboardInterrupt:
        written = "" if ranks.rank else ": no run was written"
        print(f"\n{prefix}interrupted before training{written}", file=sys.stderr)
        return 130
    code = None if train_set is not None else 1
    if ranks.rank == 0:
        if code is None:
            run_dir, code = runs.open_run(args, run_dir, cfg, saved, prefix)
        ranks.give_run_folder(None if code else run_dir)
    if code:
        return code
    return train_all(run_dir, cfg, train_set, test_set, args.device, ranks)


def train_all(run_dir, cfg, train_set, test_set, device, ranks=None):
    """Train what is left of the run's jobs (those this rank takes, under torchrun), then print the
    run's table (rank 0, once every rank is done); returns the exit code.

    A job whose files are damaged is reported and left as it is; the others still train.
    """
    ranks = ranks or Ranks()
    prefix, resume = ranks.prefix, ranks.resume_command(run_dir)
    count = torch.get_num_threads()
    threads = f", {count} thread{'s' * (count > 1)}" if device.type == "cpu" else ""
    print(f"{prefix}run {run_dir} on {device}{threads}", flush=True)
    todo = runs.jobs(cfg, slowest_first=ranks.several)
    train_set, val_set = train_set.held_out(cfg["val_size"])
    trained, failed = 0, 0
    try:
        for index in ranks.take(len(todo)):
            name, seed = todo[index]
            out = job_dir(run_dir, name, seed, cfg["per_seed"])
            try:
                trained += run_job(
                    name, seed, cfg, out, train_set, test_set, device, prefix, val_set
                )
            except RunError as e:
                cli.error(f"{e}; move {out} away to train {name} seed {seed} from scratch", prefix)
                failed += 1
        trained, failed = ranks.finish(trained, failed)
    # a full disk, say: every completed epoch is still on disk
    except OSError as e:
        where = e.filename or run_dir
        cli.error(
            f"{where}: {e.strerror}; completed epochs are saved: fix that, then {resume}", prefix
        )
        return 1
    # an operation this torch lacks on this device (MPS)
    except NotImplementedError as e:
        cli.error(f"{device}: {cli.first_line(e)}; try --device cpu or a newer torch", prefix)
        return 1
    # Ctrl-C or SIGTERM (from torchrun, when another rank failed)
    except (KeyboardInterrupt, RanksLost):
        if ranks.first_to_stop():
            print(
                f"\n{prefix}interrupted: completed epochs are saved; continue with: {resume}",
                flush=True,
            )
        else:
            print(f"{prefix}interrupted: completed epochs are saved", flush=True)
        return 130
    # A failed job is in its own line, and rank 0's exit code counts it: a non-zero exit here would
    # make torchrun stop the ranks still training.
    if ranks.rank != 0:
        return 0
    if not trained and not failed:
        print("every job was already complete: nothing left to train")
    print("\n" + runs.summary(run_dir, cfg))
    print(f"\nplot it: {cli.command('python', 'plot.py', run_dir)}")
    return 1 if failed else 0


if __name__ == "__main__":
    cli.safe_console()
    sys.exit(main(sys.argv[1:]))
