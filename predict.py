"""The trained models on your own digits: a photo of a page, a scan, a drawing.

    python predict.py seven.jpg                       # every model of runs/latest
    python predict.py a.png b.jpg --model lenet5 --json
    python predict.py seven.jpg --view views          # also save the 28x28 image the models saw
    python predict.py --serve                         # a page to draw on, at http://127.0.0.1:8000

Every image is first made to look like an MNIST digit (preprocess.py); the command line and the
page share it. Each model then says whether it takes the image for a digit, by the rule its run
stored (outliers.py), and how sure it is, calibrated.
"""

import argparse
import contextlib
import functools
import http.server
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image

import cli
import outliers
import runs
from dataset import IMAGE_SIDE
from model import MODELS, inside
from preprocess import ImageInputError, open_image, to_mnist
from runs import RunError

MAX_BODY = 2_000_000  # bytes of one image sent to the page's endpoint
PAGE = Path(__file__).with_name("predict.html")


# ------------------------------------------------------------ models


def load_models(run, names=None):
    """{model name: [model per seed]}: the final weights of the jobs the run's config.json lists,
    each with its not-a-digit rule as ``model.rule`` (None in a run made before rules; a seed after
    the first's without its bank); RunError naming what is wrong."""
    run_dir = runs.find_run(run)
    if not run_dir.is_dir():
        raise RunError(f"{run}: no such run folder; train first: python main.py")
    if not (run_dir / "config.json").is_file():
        raise RunError(
            f"{run_dir}: no config.json, so not a run of main.py; train first: python main.py"
        )
    models = {}
    for name, _, folder in runs.trained_jobs(run_dir):
        model = runs.load_model(folder)[0]
        # only a first seed's rule decides (classify): the others' banks, 32 MB or more, stay out
        model.rule = outliers.load_rule(folder, bank=name not in models)
        models.setdefault(name, []).append(model)
    if names:
        missing = [name for name in names if name not in models]
        if missing:
            raise RunError(f"{run_dir}: holds no trained {', '.join(missing)}")
        models = {name: models[name] for name in names}
    if not models:
        raise RunError(f"{run_dir}: no trained model in it; train first: python main.py")
    order = list(MODELS)
    return dict(sorted(models.items(), key=lambda item: order.index(item[0])))


@torch.inference_mode()
def classify(models, image, maps=False):
    """{model name: {digit, probs, is_digit, confidence}} for one normalized image.

    ``probs`` are each seed's probabilities, calibrated by the temperature of its rule, averaged
    over the seeds, and ``confidence`` their largest. Whether the model takes the image for a digit
    (``is_digit``) is its first seed's rule's to say (one rule a model keeps the page's answer
    quick), and always yes without one (a run made before rules). With ``maps``, also {model name:
    {layer: its activations, ``scaled``}} of each model's first seed, taken with forward hooks
    (model.inside) in the same forward pass.
    """
    results, seen = {}, {}
    for name, (first, *others) in models.items():
        rule = getattr(first, "rule", None)
        with outliers.features_of(first) as got:
            logits, layers = inside(first, image) if maps else (first(image), {})
        seen[name] = {layer: scaled(values[0]) for layer, values in layers.items()}
        probs = [outliers.calibrated(rule, logits)]
        probs += [outliers.calibrated(getattr(m, "rule", None), m(image)) for m in others]
        mean = torch.cat(probs).mean(0)
        results[name] = {
            "digit": int(mean.argmax()),
            "probs": mean.tolist(),
            "is_digit": not outliers.can_refuse(rule)
            or bool(outliers.judge(rule, logits, got["features"])[1]),
            "confidence": mean.max().item(),
        }
    return (results, seen) if maps else results


def scaled(values):
    """Whole numbers for the page, a layer at a time: ``values`` times 255 over its largest
    magnitude, rounded (activations after ReLU come to 0..255, signed weights to -255..255; all
    zeros stay 0)."""
    top = values.abs().max()
    return (values * (255 / top) if top > 0 else values).round().to(torch.int16).tolist()


def mlp_weights(models):
    """The MLP's first-layer weights (first seed) as 75 images of 28x28, scaled; None without."""
    if "mlp" not in models:
        return None
    return scaled(models["mlp"][0].fc1.weight.detach().view(-1, IMAGE_SIDE, IMAGE_SIDE))


def answer(models, data, maps=False):
    """What the command line and the page say of one image's bytes: ({name: {digit, probs,
    is_digit, confidence}}, view), and with ``maps`` a third item, what each model's first seed
    computed on the way (``classify``)."""
    image, view = to_mnist(open_image(data))
    if not maps:
        return classify(models, image), view
    results, seen = classify(models, image, maps=True)
    return results, view, seen


def describe(result):
    """A model's answer in words: its digit and three likeliest, or that it takes none."""
    digit, probs = result["digit"], result["probs"]
    if not result["is_digit"]:
        return f"not a digit (closest: {digit}, {result['confidence']:.0%})"
    top = sorted(range(10), key=lambda d: -probs[d])[:3]
    return f"{digit}  ({', '.join(f'{d}: {probs[d]:.1%}' for d in top)})"


# ------------------------------------------------------------ the page


IDLE_SECONDS = 5  # a connection that sends nothing for this long is closed
REQUEST_SECONDS = 10  # and one whose request line, headers and body take longer than this
DECODERS = 2  # images decoded at once; a request waits for its turn ...
DECODE_WAIT = 10  # ... this many seconds at most, then gets 503


def make_server(
    models,
    host="127.0.0.1",
    port=8000,
    idle=IDLE_SECONDS,
    deadline=REQUEST_SECONDS,
    decode_wait=DECODE_WAIT,
):
    """The page's server: one page (GET /), one endpoint (POST /predict, an image as the body) and
    the MLP's first-layer weights for the page to draw (GET /weights); a thread per connection, each
    connection bounded in time, DECODERS images decoded at once."""
    server = PageServer((host, port), functools.partial(Handler, models))
    server.idle, server.deadline, server.decode_wait = idle, deadline, decode_wait
    server.decoding = threading.BoundedSemaphore(DECODERS)
    return server


class PageServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer, and one thread more that cuts off requests read for too long
    (``reading``)."""

    request_queue_size = 128  # connections waiting to be accepted: a class opening the page at once

    def __init__(self, *args, **kwargs):
        # {socket: when its request must have been read}
        self.reading, self.lock = {}, threading.Lock()
        self.closed = threading.Event()
        self.watcher = threading.Thread(target=self.watch, daemon=True)
        self.watcher.start()
        super().__init__(*args, **kwargs)

    def server_close(self):
        # a daemon thread still running when the interpreter exits can abort it ("terminate called
        # without an active exception"): the watcher ends with the server
        self.closed.set()
        self.watcher.join()
        super().server_close()

    def watch(self, every=0.1):
        """Shut the sockets whose request is not read by its deadline: their reads then come back
        empty. A socket timeout alone cannot: a client trickling a byte at a time never lets a read
        time out."""
        while not self.closed.wait(every):
            with self.lock:
                late = [s for s, deadline in self.reading.items() if deadline < time.monotonic()]
                for connection in late:
                    del self.reading[connection]
            for connection in late:
                with contextlib.suppress(OSError):  # closed meanwhile
                    connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address):
        """A client that went away mid-answer, or too slow to finish its request, is not the
        server's error: it ends that connection and nothing more. Anything else is a traceback, as
        socketserver prints it."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def printable(text):
    """``text`` for the terminal, its control characters (a request path's) as \\x.. escapes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, models, *args, **kwargs):
        self.models = models
        super().__init__(*args, **kwargs)

    def setup(self):
        # StreamRequestHandler puts it on the socket: every read is bounded
        self.timeout = self.server.idle
        super().setup()

    def handle_one_request(self):
        """One request, read within the server's deadline (PageServer.watch), else cut off."""
        with self.server.lock:
            self.server.reading[self.connection] = time.monotonic() + self.server.deadline
        try:
            super().handle_one_request()
        finally:
            self.mark_read()

    def mark_read(self):
        """The request is read: from here on the answer takes what time it takes."""
        with self.server.lock:
            self.server.reading.pop(self.connection, None)

    def log_message(self, format, *args):  # one line per bad request is enough, see reply()
        pass

    def reply(self, status, body, kind="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        if status >= 400:
            print(
                printable(f"{self.command} {self.path}: {status} {body.get('error')}"),
                file=sys.stderr,
            )
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/weights":
            if (weights := mlp_weights(self.models)) is None:
                return self.reply(
                    404, {"error": "the run has no trained mlp, so no weights to show"}
                )
            return self.reply(200, {"fc1": weights})
        if self.path not in ("/", "/index.html"):
            return self.reply(404, {"error": f"no page {self.path}; the page is /"})
        self.reply(200, PAGE.read_bytes(), "text/html; charset=utf-8")

    def discard(self, length):
        """Read and drop a refused body, so that the client, still sending it, gets to read the
        answer instead of a broken pipe; a body too large even for that is left unread."""
        if length > 4 * MAX_BODY:
            return
        while length > 0 and (chunk := self.rfile.read(min(length, 1 << 16))):
            length -= len(chunk)

    def do_POST(self):
        if self.path != "/predict":
            return self.reply(404, {"error": f"no endpoint {self.path}; POST an image to /predict"})
        header = self.headers.get("Content-Length")
        if header is None or not re.fullmatch(r"[0-9]+", header.strip()):
            self.close_connection = True  # the body, if any, is left unread
            if header is None:
                return self.reply(411, {"error": "the request needs a Content-Length"})
            return self.reply(
                400, {"error": f"Content-Length {header!r} is not a whole number of bytes"}
            )
        length = int(header)
        if length > MAX_BODY:
            self.discard(length)
            self.close_connection = True
            return self.reply(
                413, {"error": f"the image is {length:,} bytes, more than {MAX_BODY:,}"}
            )
        body = self.rfile.read(length)
        self.mark_read()  # the decoding below takes what time it takes
        if len(body) < length:  # the client stopped sending, or the deadline cut it off
            self.close_connection = True
            return
        if not self.server.decoding.acquire(timeout=self.server.decode_wait):
            return self.reply(503, {"error": "busy: other images are being decoded; try again"})
        try:
            models, view, maps = answer(self.models, body, maps=True)
        except ImageInputError as e:
            return self.reply(422 if "no ink" in str(e) else 400, {"error": str(e)})
        finally:
            self.server.decoding.release()
        self.reply(200, {"models": models, "view": view.tolist(), "inside": maps})


# ------------------------------------------------------------ CLI


def view_names(paths):
    """{path: the file name of its view}: its own name as PNG, numbered when two images share a name
    (a/seven.png and b/seven.jpg give seven.png and seven-2.png)."""
    names, taken = {}, set()
    for path in paths:
        name, k = f"{path.stem}.png", 1
        while name in taken:
            k += 1
            name = f"{path.stem}-{k}.png"
        names[path] = name
        taken.add(name)
    return names


def predict_files(models, paths, as_json=False, view_dir=None):
    """Answer each image; a failure is one line naming the file and the others are still answered.
    Returns the number of images that failed."""
    failed, views = 0, view_names(paths)
    for path in paths:
        try:
            results, view = answer(models, path.read_bytes())
        except (ImageInputError, OSError) as e:
            failed += 1
            reason = e.strerror if isinstance(e, OSError) else str(e)
            if as_json:
                print(json.dumps({"image": str(path), "error": reason}))
            else:
                cli.error(f"{path}: {reason}; nothing predicted")
            continue
        saved = {}
        if view_dir is not None:
            Image.fromarray(view).save(view_dir / views[path])
            saved = {"view": str(view_dir / views[path])}
        if as_json:
            print(json.dumps({"image": str(path), "models": results, **saved}))
        else:
            print(path)
            for name, result in results.items():
                print(f"  {name:<10}  {describe(result)}")
            if saved:
                print(f"  {'view':<10}  {saved['view']}")
    return failed


def port(text):
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    if not text.isdecimal() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = cli.parser("predict.py", __doc__)
    p.add_argument(
        "images", nargs="*", type=Path, help="image files (PNG, JPEG, any format PIL reads)"
    )
    p.add_argument("--run", type=Path, default=Path("runs") / runs.LATEST, help="run folder")
    p.add_argument(
        "--model", help=f"comma list of {', '.join(MODELS)}; without it, every model the run has"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line and image")
    p.add_argument(
        "--view",
        type=Path,
        metavar="DIR",
        help="write the 28x28 image the models were given to DIR",
    )
    p.add_argument("--serve", action="store_true", help="serve the drawing page instead")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on; 0.0.0.0 serves the networks this machine is on",
    )
    p.add_argument("--port", type=port, default=8000, help="port to serve on")
    args = p.parse_args(cli.arguments(argv))
    if not args.images and not args.serve:
        p.error("name at least one image, or --serve")
    if args.view is not None:
        try:
            args.view.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            reason = "a file, not a folder" if args.view.is_file() else e.strerror
            p.error(f"argument --view: {args.view}: {reason}")
    return args


def main(argv=None):
    """The command line; the exit code is 1 when any image (or the run) failed."""
    args = parse_args(argv)
    try:
        models = load_models(args.run, args.model and [n.strip() for n in args.model.split(",")])
    except RunError as e:
        cli.error(e)
        return 1
    if old := [name for name, seeds in models.items() if any(m.rule is None for m in seeds)]:
        cli.warning(
            f"{args.run}: made before not-a-digit rules, so {', '.join(old)} cannot refuse an"
            f" image; {cli.command('python', 'main.py', '--resume', args.run)} adds them"
        )
    if not args.serve:
        return 1 if predict_files(models, args.images, args.json, args.view) else 0
    try:
        server = make_server(models, args.host, args.port)
    except OSError as e:
        cli.error(f"{args.host}:{args.port}: cannot serve there ({e.strerror})")
        return 1
    print(f"drawing page at http://{args.host}:{server.server_port} (Ctrl-C stops it)", flush=True)
    with server, cli.sigterm_as_ctrl_c(), contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    cli.safe_console()
    sys.exit(main(sys.argv[1:]))
