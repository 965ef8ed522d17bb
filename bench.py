"""Speed of this project's data path and training loop against the obvious baselines, in one process.

    python bench.py                    # about 1.5 minutes on a 2-core CPU
    python bench.py --steps 1875       # whole epochs (60,000 images at batch 32)
    python bench.py --device cuda      # on a GPU: the same, plus main.train without CUDA graphs
    python bench.py --page runs/latest # the drawing page's endpoint instead, on that run's models
    python bench.py --page runs/latest --load 20   # the page's server under a class's load, for 20 s

Seconds to load train.tar the first time (every PNG decoded) and from the cache, then
(a) samples per second delivered to a training loop (on --device) by
    naive     a Dataset that opens the tar and decodes one PNG per __getitem__,
    textbook  per item: uint8 array -> PIL image -> ToTensor -> Normalize, collated by a DataLoader,
    project   dataset.MNIST sliced a batch at a time by batch_loader.
(b) Seconds per training epoch at batch 32, per model, for
    textbook  the textbook loader and an eager loop that calls loss.item() every step,
    plain     an eager loop over in-memory normalized tensors (NCHW, default SGD, .item() every step),
    main      main.train() over batch_loader(), as python main.py runs it (for lenet5_reg, over the
              split that MNIST.distorted() augments once per epoch, its time added to the epoch's);
    on CUDA also  main.train() with every kernel launched from Python (no CUDA graph);
    for lenet5_reg also  main.train() without its augmentation, to give the augmentation's cost.
Every time is the median of --repeats interleaved runs; epochs are extrapolated from --steps steps.
With --page: milliseconds per POST /predict of a 280x280 drawing over loopback, one request at a time
as the page sends them, with each model's feature maps in the answer; against predict.answer() in
the same process without the maps and without HTTP.
With --page and --load SECONDS: `predict.py --serve` in a process of its own, for that long, under
20 clients drawing at once (each draws a digit for DRAW_SECONDS, sending its next drawing as soon as
the last is answered, as the page does, then looks at the answer for --look seconds),
100 idle connections held open (each opened again as soon as the server closes it) and 4 oversized
images sent at once (two 7,000x7,000 PNGs, two 48-megapixel JPEGs): every drawing's answer, their
latencies, and the server's peak memory.
Prints a table, then one JSON line with every number.
"""

import argparse
import functools
import http.client
import io
import itertools
import json
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

import main
import predict
from dataset import MEAN, MNIST, STD, batch_loader, find_splits, safe_console
from model import MODELS, CustomMLP, LeNet5, LeNet5Regularized

BATCH = 32
CPU = torch.device("cpu")
EPOCH_STEPS = 60_000 // BATCH
TEXTBOOK_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])


class TextbookLeNet5(LeNet5):
    """LeNet-5 as tutorials write it: ReLU, then pool. The same function as LeNet5 (which pools first)."""

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
BASELINE_MODELS = {"lenet5": TextbookLeNet5, "mlp": CustomMLP, "lenet5_reg": TextbookLeNet5Regularized}


class NaiveTarMNIST(Dataset):
    """What many course submissions do: keep the tar open, decode a PNG on every access."""

    def __init__(self, path):
        self.tar = tarfile.open(path)
        self.members = sorted((m for m in self.tar.getmembers() if m.isfile()), key=lambda m: m.name)

    def __len__(self):
        return len(self.members)

    def __getitem__(self, i):
        member = self.members[i]
        image = Image.open(io.BytesIO(self.tar.extractfile(member).read()))
        return TEXTBOOK_TRANSFORM(image), int(member.name.rsplit("_", 1)[1].split(".")[0])


class TextbookMNIST(Dataset):
    """The tutorial pipeline: decoded uint8 images in memory, one PIL image and transform per item."""

    def __init__(self, images, labels):
        self.images, self.labels = images.numpy(), labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return TEXTBOOK_TRANSFORM(Image.fromarray(self.images[i], mode="L")), self.labels[i]


def synchronize(device):
    """Wait for the device's queued work: GPU kernels run after the Python that launched them returns."""
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


# --------------------------------------------------------------------------- training loops


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
    model, optimizer, _ = main.build(name, cfg, train_set.device)  # as python main.py builds them
    batches = itertools.islice(batch_loader(train_set, BATCH, torch.Generator().manual_seed(0)), steps)
    main.train(model, batches, train_set.device, torch.nn.CrossEntropyLoss(), optimizer, cuda_graph)


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=main.HelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps (batches) timed per measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the median is reported")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="folder of train.tar")
    p.add_argument("--idx-dir", type=Path, help="IDX files to build missing tars from")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of models to time")
    p.add_argument(
        "--device", type=main.device_arg, default="auto", help="where to train: auto, cpu, cuda, cuda:N or mps"
    )
    p.add_argument("--page", type=Path, metavar="RUN", help="time the drawing page's endpoint on RUN's models instead")
    p.add_argument("--requests", type=int, default=100, help="with --page: requests timed")
    p.add_argument("--load", type=float, metavar="SECONDS", help="with --page: the server under load for so long")
    p.add_argument("--clients", type=int, default=20, help="with --load: clients drawing at once")
    p.add_argument("--idle", type=int, default=100, help="with --load: idle connections held open")
    p.add_argument("--look", type=float, default=LOOK_SECONDS, help="with --load: seconds each client pauses "
                   f"after drawing for {DRAW_SECONDS:g} s (0: draws without a pause)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.device = main.pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    return args


def load_times(train_tar):
    """Seconds to read the training tar the first time (decode every PNG, write the cache), then from the cache."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(shutil.copy(train_tar, tmp))
        return {"first": seconds(lambda: MNIST(copy)), "cached": median_time(lambda: MNIST(copy), 3)}


def drawing():
    """A 280x280 PNG as the page sends it: a 7 drawn in strokes 22 pixels wide, dark on white."""
    image = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(image).line([(60, 60), (220, 60), (120, 240)], fill="black", width=22, joint="curve")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def page_times(run_dir, requests):
    """{"request_ms": [each POST /predict over loopback, maps included], "answer_ms": [each predict.answer
    in process, without them]}, interleaved, after one warm-up of each."""
    models, body = predict.load_models(run_dir), drawing()
    server = predict.make_server(models, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port)  # kept alive, as a browser does

    def ask():
        connection.request("POST", "/predict", body, {"Content-Type": "image/png"})
        response = connection.getresponse()
        assert response.status == 200 and "inside" in json.loads(response.read())

    times = {"request_ms": [], "answer_ms": []}
    try:
        for k in range(requests + 1):
            for key, call in (("request_ms", ask), ("answer_ms", lambda: predict.answer(models, body))):
                if k:  # the first round warms up
                    times[key].append(seconds(call) * 1000)
                else:
                    call()
    finally:
        connection.close()
        server.shutdown()
        server.server_close()
    return times


def oversized():
    """Two images a server must not decode whole: a 7,000x7,000 grey PNG and a 8,000x6,000 JPEG of a digit."""
    images = []
    for size, kind in (((7000, 7000), "PNG"), ((8000, 6000), "JPEG")):
        image = Image.new("L", size, 255)
        ImageDraw.Draw(image).line([(2000, 1500), (5000, 1500), (3000, 4500)], fill=0, width=400)
        buffer = io.BytesIO()
        image.save(buffer, format=kind)
        images.append(buffer.getvalue())
    return images


DRAW_SECONDS, LOOK_SECONDS = 1.0, 1.0  # a student at the page: a digit drawn in a second, its answer read in one


def load_test(run_dir, seconds, clients, idle, look=LOOK_SECONDS):
    """The page's server (``predict.py --serve``, a process of its own) under load; returns the numbers.
    ``look=0``: every client draws without a pause, the most a server can be asked."""
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("predict.py")), "--serve", "--run", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    port = int(server.stdout.readline().split("http://127.0.0.1:")[1].split()[0])
    body, big = drawing(), oversized()
    end = time.monotonic() + seconds
    drawn, refused, idle_opened = [], [], [0]

    def draw(start):
        """A student at the page: a digit drawn in DRAW_SECONDS, during which the page sends the next drawing
        as soon as the last is answered, then LOOK_SECONDS looking at the answer; ``start``: when to begin."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        time.sleep(start)
        while time.monotonic() < end:
            digit_end = time.monotonic() + DRAW_SECONDS
            while time.monotonic() < min(digit_end, end):
                sent = time.perf_counter()
                try:
                    connection.request("POST", "/predict", body, {"Content-Type": "image/png"})
                    response = connection.getresponse()
                    answer = response.read()
                    drawn.append((response.status, (time.perf_counter() - sent) * 1000, b'"inside"' in answer))
                except OSError as e:  # no answer at all
                    drawn.append((type(e).__name__, (time.perf_counter() - sent) * 1000, False))
                    connection.close()
            time.sleep(look)

    def send_oversized(image):  # once, when every student has started
        time.sleep(2.5)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request("POST", "/predict", image)
            refused.append(connection.getresponse().status)
        except OSError as e:
            refused.append(type(e).__name__)
        connection.close()

    def hold_idle():
        while time.monotonic() < end:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                idle_opened[0] += 1
                connection.settimeout(max(0.1, end - time.monotonic()))
                try:
                    connection.recv(1)  # b"" when the server closes it
                except (TimeoutError, OSError):
                    pass

    workers = [threading.Thread(target=hold_idle) for _ in range(idle)]
    workers += [threading.Thread(target=send_oversized, args=(big[k % 2],)) for k in range(4)]
    starts = random.Random(0).sample(range(1000), clients)  # the students start apart, within 2 s
    workers += [threading.Thread(target=draw, args=(2 * k / 1000,)) for k in starts]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        server.send_signal(signal.SIGINT)  # predict.py --serve ends on Ctrl-C
        server.wait(timeout=30)
    import resource  # Unix only, so not at the top: bench.py runs on Windows too

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # of the server, the one child
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
    latencies = [ms for status, ms, _ in drawn if status == 200]
    return {
        "seconds": seconds, "clients": clients, "look_s": look, "idle": idle, "idle_connections_opened": idle_opened[0],
        "drawings": len(drawn), "answered": sum(status == 200 and maps for status, _, maps in drawn),
        "median_ms": statistics.median(latencies) if latencies else None,
        "p90_ms": statistics.quantiles(latencies, n=10)[-1] if len(latencies) > 1 else None,
        "oversized": {str(status): refused.count(status) for status in sorted(set(refused), key=str)},
        "server_peak_mb": peak_mb,
    }  # fmt: skip


def page_cli(args):
    if args.load:
        result = {"torch": torch.__version__, "cpu": main.cpu_name(),
                  **load_test(args.page, args.load, args.clients, args.idle, args.look)}  # fmt: skip
        print(f"torch {torch.__version__}, {main.cpu_name()}; predict.py --serve for {args.load:g} s under "
              f"{args.clients} clients drawing, {args.idle} idle connections and 4 oversized images")
        print(f"drawings: {result['answered']} of {result['drawings']} answered, median {result['median_ms']:.1f} ms, "
              f"90th percentile {result['p90_ms']:.1f} ms")
        print(f"oversized images: {result['oversized']} (status: count); idle connections opened: "
              f"{result['idle_connections_opened']}; the server's peak memory: {result['server_peak_mb']:.0f} MB")
        print(json.dumps(result))
        return result
    times = page_times(args.page, args.requests)
    medians = {key: statistics.median(t) for key, t in times.items()}
    p90 = statistics.quantiles(times["request_ms"], n=10)[-1] if len(times["request_ms"]) > 1 else medians["request_ms"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {main.cpu_name()}")
    print(f"POST /predict with the maps, {args.requests} requests of a 280x280 drawing over loopback: median "
          f"{medians['request_ms']:.1f} ms, 90th percentile {p90:.1f} ms")  # fmt: skip
    print(f"predict.answer in process, without the maps: median {medians['answer_ms']:.1f} ms "
          f"(the request takes {medians['request_ms'] / medians['answer_ms']:.2f}x)")  # fmt: skip
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": main.cpu_name(),
              "requests": args.requests, "median_ms": medians, "request_p90_ms": p90}  # fmt: skip
    print(json.dumps(result))
    return result


def run(args):
    torch.manual_seed(0)
    train_tar, _ = find_splits(args.data_dir, args.idx_dir, folders=False)  # the naive baseline reads a tar
    loads = load_times(train_tar)
    project = MNIST(train_tar)
    textbook = TextbookMNIST(project.images, project.labels)
    naive = NaiveTarMNIST(train_tar)  # indexing the tar's members is set-up, not per-sample work
    project.to(args.device)  # as main.py keeps it; the baselines copy each batch to the device
    steps, device = args.steps, args.device

    def textbook_loader():
        return DataLoader(textbook, batch_size=BATCH, shuffle=True)

    data_paths = {  # (batches drained, a fresh loader); the naive path is slow, and fewer batches give the same rate
        "naive": (max(steps // 10, 10), lambda: DataLoader(naive, batch_size=BATCH, shuffle=True)),
        "textbook": (steps, textbook_loader),
        "project": (steps, lambda: batch_loader(project, BATCH, torch.Generator().manual_seed(0))),
    }
    samples = {
        path: n * BATCH / median_time(functools.partial(drain, loader, n, device), args.repeats, device)
        for path, (n, loader) in data_paths.items()
    }

    main_defaults = vars(main.parse_args([]))
    epochs = {}
    for name in args.models.split(","):
        augmented = main.uses_augmentation(name, main_defaults)
        served = project.distorted() if augmented else project  # one epoch's distorted split
        loops = {
            "textbook": lambda name=name: textbook_epoch(BASELINE_MODELS[name](), textbook_loader(), steps, device),
            "plain": lambda name=name: plain_epoch(BASELINE_MODELS[name](), project.normalized, project.labels, steps),
            "main": lambda name=name, served=served: main_epoch(name, main_defaults, served, steps),
        }
        if device.type == "cuda":
            loops["main_no_graph"] = lambda name=name, served=served: main_epoch(
                name, main_defaults, served, steps, cuda_graph=False
            )
        if augmented:
            loops["main_no_augment"] = lambda name=name: main_epoch(name, main_defaults, project, steps)
            loops["distort"] = project.distorted  # once per epoch, for the whole split
        for loop in loops.values():  # warm-up: first calls allocate and pick kernels
            loop()
        times = {loop: [] for loop in loops}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every loop
            for loop, fn in loops.items():
                times[loop].append(seconds(fn, device))
        epochs[name] = {loop: statistics.median(t) * EPOCH_STEPS / steps for loop, t in times.items()}
        if augmented:  # the split is distorted once an epoch, not once per step
            distort = epochs[name].pop("distort") * steps / EPOCH_STEPS
            for loop in ("main", "main_no_graph"):
                if loop in epochs[name]:
                    epochs[name][loop] += distort
    return loads, samples, epochs


def main_cli(argv=None):
    args = parse_args(argv)
    if args.page:
        return page_cli(args)
    loads, samples, epochs = run(args)
    device = args.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {main.cpu_name()}" + (f", {gpu}" if gpu else "")
    )
    print(f"device {device}, steps {args.steps} x batch {BATCH}, median of {args.repeats}\n")
    print(f"loading train.tar: first {loads['first']:.2f} s (decode + cache), cached {loads['cached']:.2f} s\n")
    print(f"{'data path':<10} {'samples/s':>12} {'vs textbook':>12}")
    for name, rate in samples.items():
        print(f"{name:<10} {rate:>12,.0f} {rate / samples['textbook']:>11.1f}x")
    loops = [loop for loop in next(iter(epochs.values())) if loop != "main_no_augment"]  # textbook, plain, main[, ...]
    ratios = {
        name: {f"main/{loop}": t["main"] / t[loop] for loop in loops if loop != "main"} for name, t in epochs.items()
    }
    columns = [f"{loop} s" for loop in loops] + list(next(iter(ratios.values())))
    widths = [max(len(c), 8) for c in columns]
    print("\n" + f"{'model':<11}" + "".join(f" {c:>{w}}" for c, w in zip(columns, widths)))
    for name, t in epochs.items():
        values = [t[loop] for loop in loops] + list(ratios[name].values())
        print(f"{name:<11}" + "".join(f" {v:>{w}.2f}" for v, w in zip(values, widths)))
    for name, t in epochs.items():
        if "main_no_augment" in t:
            ratios[name]["augmented/not"] = t["main"] / t["main_no_augment"]
            print(f"{name}'s augmentation: {t['main']:.2f} s per epoch with it, {t['main_no_augment']:.2f} s without "
                  f"({ratios[name]['augmented/not']:.2f}x)")  # fmt: skip
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": main.cpu_name(),
        "device": str(device),
        "gpu": gpu,
        "steps": args.steps,
        "repeats": args.repeats,
        "load_s": loads,
        "samples_per_s": samples,
        "epoch_s": epochs,
        "ratios": ratios,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    safe_console()
    main_cli()
