"""Speed of the data path and training loop against the obvious baselines, in one process.

    python bench.py                    # about 1.5 minutes on a 2-core CPU
    python bench.py --steps 1875       # whole epochs (60,000 images at batch 32)
    python bench.py --device cuda      # on a GPU: the same, plus main.train without CUDA graphs
    python bench.py --page runs/latest # the drawing page's endpoint instead, on that run's models
    python bench.py --page runs/latest --load 20   # the page's server under a class's load, 20 s
    python bench.py --sweep runs/latest # the robustness sweep, one seed of each model of that run
    python bench.py --rule runs/latest  # fitting the not-a-digit rule of each model of that run

Seconds to load train.tar the first time (every PNG decoded) and from the cache, then
(a) samples per second delivered to a training loop (on --device) by
    naive     a Dataset that opens the tar and decodes one PNG per __getitem__,
    textbook  per item: uint8 array -> PIL image -> ToTensor -> Normalize, collated by a DataLoader,
    project   dataset.MNIST sliced a batch at a time by batch_loader.
(b) Seconds per training epoch at batch 32, per model, for
    textbook  the textbook loader and an eager loop that calls loss.item() every step,
    plain     an eager loop over in-memory normalized tensors (NCHW, plain SGD, .item() each step),
    main      main.train() over batch_loader(), as python main.py runs it (for lenet5_reg, over the
              split that main.epoch_split() distorts and adds non-digits to once per epoch, that
              time added, and the steps its non-digits add counted);
    on CUDA also  main.train() with every kernel launched from Python (no CUDA graph);
    for lenet5_reg also  main.train() without its augmentation and non-digits: what they cost.
Every time is the median of --repeats interleaved runs; epochs are extrapolated from --steps steps.
With --page, the drawing page's endpoint instead (bench_page.py); with --sweep, the seconds that
robustness.sweep takes over every family for one seed of each model, as plot.py runs it; with
--rule, the seconds that fitting each model's rule adds to the end of its job in main.py.
Prints a table, then one JSON line with every number.
"""

import functools
import io
import itertools
import json
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import bench_page
import cli
import machine
import main as training
import outliers
import plot
import robustness
import runs
from dataset import MEAN, MNIST, STD, batch_loader, find_splits, load_splits, to_unit
from model import MODELS, CustomMLP, LeNet5, LeNet5Regularized

BATCH = 32
CPU = torch.device("cpu")
EPOCH_STEPS = 60_000 // BATCH
TEXTBOOK_TRANSFORM = transforms.Compose(
    [transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))]
)


class TextbookLeNet5(LeNet5):
    """LeNet-5 as tutorials write it: ReLU, then pool; LeNet5's function (it pools first)."""

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class TextbookLeNet5Regularized(LeNet5Regularized):
    """The regularized LeNet-5 as tutorials write it: BatchNorm, ReLU, then pool."""

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.dropout(self.relu(self.bn3(self.fc1(x.flatten(1)))))
        x = self.dropout(self.relu(self.bn4(self.fc2(x))))
        return self.fc3(x)


# The models the baselines train: the obvious layer order, default (NCHW) memory format.
BASELINE_MODELS = {
    "lenet5": TextbookLeNet5,
    "mlp": CustomMLP,
    "lenet5_reg": TextbookLeNet5Regularized,
}


class NaiveTarMNIST(Dataset):
    """What many course submissions do: keep the tar open, decode a PNG on every access."""

    def __init__(self, path):
        # open for the dataset's life, as the naive way has it
        self.tar = tarfile.open(path)  # noqa: SIM115
        self.members = sorted(
            (m for m in self.tar.getmembers() if m.isfile()), key=lambda m: m.name
        )

    def __len__(self):
        return len(self.members)

    def __getitem__(self, i):
        member = self.members[i]
        image = Image.open(io.BytesIO(self.tar.extractfile(member).read()))
        return TEXTBOOK_TRANSFORM(image), int(member.name.rsplit("_", 1)[1].split(".")[0])


class TextbookMNIST(Dataset):
    """The tutorial pipeline: uint8 images in memory, a PIL image and transform per item."""

    def __init__(self, images, labels):
        self.images, self.labels = images.numpy(), labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return TEXTBOOK_TRANSFORM(Image.fromarray(self.images[i], mode="L")), self.labels[i]


def synchronize(device):
    """Wait for the device's queued work: GPU kernels run after their Python returns."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds(fn, device=CPU):
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_time(fn, repeats, device=CPU):
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def drain(make_loader, steps, device):
    """Take ``steps`` batches from a fresh loader to the device, as a training loop would."""
    for i, (images, labels) in enumerate(make_loader()):
        images, labels = images.to(device), labels.to(device)
        if i + 1 == steps:
            break


# ------------------------------------------------------------ training loops


def textbook_epoch(model, loader, steps, device):
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    total = 0.0
    for i, (images, labels) in enumerate(loader):
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
        if i + 1 == steps:
            break
    return total


def plain_epoch(model, images, labels, steps):
    model.to(labels.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    order = torch.randperm(len(labels), device=labels.device)
    total = 0.0
    for i in range(steps):
        index = order[i * BATCH : (i + 1) * BATCH]
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total


def main_epoch(name, cfg, train_set, steps, cuda_graph=True):
    # as python main.py builds them
    model, optimizer, _ = training.build(name, cfg, train_set.device)
    batches = itertools.islice(
        batch_loader(train_set, BATCH, torch.Generator().manual_seed(0)), steps
    )
    training.train(
        model, batches, train_set.device, training.loss(name, cfg), optimizer, cuda_graph
    )


# ------------------------------------------------------------ CLI


def parse_args(argv=None):
    p = cli.parser("bench.py", __doc__)
    p.add_argument(
        "--steps", type=int, default=300, help="training steps (batches) timed per measurement"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved repetitions; the median is reported"
    )
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="folder of train.tar")
    p.add_argument("--idx-dir", type=Path, help="IDX files to build missing tars from")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of models to time")
    p.add_argument(
        "--device",
        type=machine.device_arg,
        default="auto",
        help="where to train: auto, cpu, cuda, cuda:N or mps",
    )
    p.add_argument(
        "--page",
        type=Path,
        metavar="RUN",
        help="time the drawing page's endpoint on RUN's models instead",
    )
    p.add_argument("--requests", type=int, default=100, help="with --page: requests timed")
    sweep = "time the robustness sweep of RUN's first seed of each model instead"
    p.add_argument("--sweep", type=Path, metavar="RUN", help=sweep)
    rule = "time fitting the not-a-digit rule of RUN's first seed of each model instead"
    p.add_argument("--rule", type=Path, metavar="RUN", help=rule)
    p.add_argument(
        "--load",
        type=float,
        metavar="SECONDS",
        help="with --page: the server under load for so long",
    )
    p.add_argument("--clients", type=int, default=20, help="with --load: clients drawing at once")
    p.add_argument("--idle", type=int, default=100, help="with --load: idle connections held open")
    drawing = f"{bench_page.DRAW_SECONDS:g} s"
    look = f"with --load: seconds each client pauses after drawing for {drawing} (0: none)"
    p.add_argument("--look", type=float, default=bench_page.LOOK_SECONDS, help=look)
    args = p.parse_args(cli.arguments(argv))
    try:
        args.device = machine.pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    return args


def load_times(train_tar):
    """Seconds to read the training tar the first time (decode every PNG, write the cache), then
    from the cache."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copy(train_tar, tmp))
        return {
            "first": seconds(lambda: MNIST(copy)),
            "cached": median_time(lambda: MNIST(copy), 3),
        }


def timings(args):
    """(load seconds, samples per second of each data path, seconds per epoch of each loop)."""
    torch.manual_seed(0)
    # the naive baseline reads a tar
    train_tar, _ = find_splits(args.data_dir, args.idx_dir, folders=False)
    loads = load_times(train_tar)
    project = MNIST(train_tar)
    textbook = TextbookMNIST(project.images, project.labels)
    naive = NaiveTarMNIST(train_tar)  # indexing the tar's members is set-up, not per-sample work
    project.to(args.device)  # as main.py keeps it; the baselines copy each batch to the device
    samples = data_rates(args, project, textbook, naive)
    defaults = vars(training.parse_args([]))
    epochs = {
        name: epoch_times(args, name, defaults, project, textbook)
        for name in args.models.split(",")
    }
    return loads, samples, epochs


def textbook_loader(textbook):
    return DataLoader(textbook, batch_size=BATCH, shuffle=True)


def data_rates(args, project, textbook, naive):
    """Samples per second that each data path delivers to the device."""
    steps, device = args.steps, args.device
    # (batches drained, a fresh loader); the naive path is slow, and fewer batches give its rate
    data_paths = {
        "naive": (max(steps // 10, 10), lambda: DataLoader(naive, batch_size=BATCH, shuffle=True)),
        "textbook": (steps, lambda: textbook_loader(textbook)),
        "project": (steps, lambda: batch_loader(project, BATCH, torch.Generator().manual_seed(0))),
    }
    rates = {}
    for path, (n, loader) in data_paths.items():
        drained = functools.partial(drain, loader, n, device)
        rates[path] = n * BATCH / median_time(drained, args.repeats, device)
    return rates


def epoch_times(args, name, defaults, project, textbook):
    """Seconds per epoch of each training loop of model ``name``, extrapolated from --steps."""
    steps, device = args.steps, args.device
    augmented = training.uses_augmentation(name, defaults)
    # one epoch's split: distorted, and with its non-digits (exposure.py), which add steps
    served = training.epoch_split(name, defaults, project)
    longer = len(served) / len(project)
    baseline = BASELINE_MODELS[name]
    loops = {
        "textbook": lambda: textbook_epoch(baseline(), textbook_loader(textbook), steps, device),
        "plain": lambda: plain_epoch(baseline(), project.normalized, project.labels, steps),
        "main": lambda: main_epoch(name, defaults, served, steps),
    }
    if device.type == "cuda":
        loops["main_no_graph"] = lambda: main_epoch(name, defaults, served, steps, False)
    if augmented:
        loops["main_no_augment"] = lambda: main_epoch(name, defaults, project, steps)
        # once per epoch, for the whole split
        loops["distort"] = lambda: training.epoch_split(name, defaults, project)
    for loop in loops.values():  # warm-up: first calls allocate and pick kernels
        loop()
    times = {loop: [] for loop in loops}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every loop
        for loop, fn in loops.items():
            times[loop].append(seconds(fn, device))
    epoch = {loop: statistics.median(t) * EPOCH_STEPS / steps for loop, t in times.items()}
    if augmented:  # the split is distorted once an epoch, not once per step
        distort = epoch.pop("distort") * steps / EPOCH_STEPS
        for loop in ("main", "main_no_graph"):
            if loop in epoch:
                epoch[loop] = epoch[loop] * longer + distort
    return epoch


def where():
    """The line every benchmark starts with: torch, its threads, the CPU."""
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine.cpu_name()}"


def training_bench(args):
    """The data paths and the training loops: print their table, return every number."""
    loads, samples, epochs = timings(args)
    device = args.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(where() + (f", {gpu}" if gpu else ""))
    print(f"device {device}, steps {args.steps} x batch {BATCH}, median of {args.repeats}\n")
    first, cached = loads["first"], loads["cached"]
    print(f"loading train.tar: first {first:.2f} s (decode + cache), cached {cached:.2f} s\n")
    print(f"{'data path':<10} {'samples/s':>12} {'vs textbook':>12}")
    for name, rate in samples.items():
        print(f"{name:<10} {rate:>12,.0f} {rate / samples['textbook']:>11.1f}x")
    ratios = print_epochs(epochs)
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": machine.cpu_name(),
        "device": str(device),
        "gpu": gpu,
        "steps": args.steps,
        "repeats": args.repeats,
        "load_s": loads,
        "samples_per_s": samples,
        "epoch_s": epochs,
        "ratios": ratios,
    }


def print_epochs(epochs):
    """The table of seconds per epoch and their ratios to main's; returns the ratios."""
    # textbook, plain, main[, main_no_graph]
    loops = [loop for loop in next(iter(epochs.values())) if loop != "main_no_augment"]
    ratios = {
        name: {f"main/{loop}": t["main"] / t[loop] for loop in loops if loop != "main"}
        for name, t in epochs.items()
    }
    columns = [f"{loop} s" for loop in loops] + list(next(iter(ratios.values())))
    widths = [max(len(c), 8) for c in columns]
    print(
        "\n"
        + f"{'model':<11}"
        + "".join(f" {c:>{w}}" for c, w in zip(columns, widths, strict=True))
    )
    for name, t in epochs.items():
        values = [t[loop] for loop in loops] + list(ratios[name].values())
        print(f"{name:<11}" + "".join(f" {v:>{w}.2f}" for v, w in zip(values, widths, strict=True)))
    for name, t in epochs.items():
        if "main_no_augment" in t:
            ratio = ratios[name]["augmented/not"] = t["main"] / t["main_no_augment"]
            print(
                f"{name}'s augmentation and non-digits: {t['main']:.2f} s per epoch with them,"
                f" {t['main_no_augment']:.2f} s without ({ratio:.2f}x)"
            )
    return ratios


def sweep_bench(run_dir):
    """--sweep: seconds for robustness.sweep over the run's test set, with the first seed's final
    weights of each of its models, each changed set made once for all of them."""
    models = {}
    for name, _, folder in runs.trained_jobs(run_dir):
        models.setdefault(name, runs.load_model(folder)[0])
    test_set = plot.load_test_split(run_dir, None)
    start = time.perf_counter()
    robustness.sweep(models, to_unit(test_set.images), test_set.labels)
    seconds = time.perf_counter() - start
    settings = sum(len(f.strengths) - 1 for f in robustness.FAMILIES.values())
    print(where())
    print(
        f"robustness.sweep of {', '.join(models)} on {len(test_set):,} test digits,"
        f" {len(robustness.FAMILIES)} families ({settings} settings): {seconds:.1f} s"
    )
    return {"torch": torch.__version__, "cpu": machine.cpu_name(), "sweep_s": seconds}


def rule_bench(run_dir):
    """--rule: seconds for outliers.write_rule with the first seed's final weights of each model,
    on the run's own training and validation splits, as main.py calls it when a job ends."""
    cfg = runs.read_config(run_dir)
    train_set, _ = load_splits(
        cfg["data_dir"], cfg["idx_dir"], torch.device("cpu"), cfg["train_limit"], cfg["test_limit"]
    )
    train_set, val_set = train_set.held_out(cfg["val_size"])
    seconds = {}
    with tempfile.TemporaryDirectory() as out:
        for name, _, folder in runs.trained_jobs(run_dir):
            if name not in seconds:
                model = runs.load_model(folder)[0]
                start = time.perf_counter()
                outliers.write_rule(out, model, train_set, val_set)
                seconds[name] = time.perf_counter() - start
    print(where())
    each = ", ".join(f"{name} {s:.2f} s" for name, s in seconds.items())
    print(f"fitting each model's rule: {each}; {sum(seconds.values()):.2f} s in all")
    return {"torch": torch.__version__, "cpu": machine.cpu_name(), "rule_s": seconds}


def main(argv=None):
    """The command line: the table, then one JSON line with every number."""
    args = parse_args(argv)
    if args.page:
        result = bench_page.page_bench(args)
    elif args.sweep:
        result = sweep_bench(args.sweep)
    elif args.rule:
        result = rule_bench(args.rule)
    else:
        result = training_bench(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    cli.safe_console()
    sys.exit(main(sys.argv[1:]))
