"""The drawing page's endpoint under test: ``python bench.py --page RUN [--load SECONDS]``.

Without --load: milliseconds per POST /predict of a 280x280 drawing over loopback, one request at
a time as the page sends them, with each model's feature maps in the answer; against
predict.answer() in the same process without the maps and without HTTP.

With --load SECONDS: `predict.py --serve` in a process of its own, for that long, under 20 clients
drawing at once (each draws a digit for DRAW_SECONDS, sending its next drawing as soon as the last
is answered, as the page does, then looks at the answer for --look seconds), 100 idle connections
held open (each opened again as soon as the server closes it) and 4 oversized images sent at once
(two 7,000x7,000 PNGs, two 48-megapixel JPEGs): every drawing's answer, their latencies, and the
server's peak memory.
"""

import contextlib
import http.client
import io
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import machine
import predict


def drawing():
    """A 280x280 PNG as the page sends it: a 7 drawn in strokes 22 pixels wide, dark on white."""
    image = Image.new("RGB", (280, 280), "white")
    ImageDraw.Draw(image).line(
        [(60, 60), (220, 60), (120, 240)], fill="black", width=22, joint="curve"
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def page_times(run_dir, requests):
    """{"request_ms": [each POST /predict over loopback, maps included], "answer_ms": [each
    predict.answer in process, without them]}, interleaved, after one warm-up of each."""
    models, body = predict.load_models(run_dir), drawing()
    server = predict.make_server(models, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # kept alive, as a browser does
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port)

    def ask():
        connection.request("POST", "/predict", body, {"Content-Type": "image/png"})
        response = connection.getresponse()
        assert response.status == 200 and "inside" in json.loads(response.read())

    times = {"request_ms": [], "answer_ms": []}
    try:
        for k in range(requests + 1):
            for key, call in (
                ("request_ms", ask),
                ("answer_ms", lambda: predict.answer(models, body)),
            ):
                if k:  # the first round warms up
                    start = time.perf_counter()
                    call()
                    times[key].append((time.perf_counter() - start) * 1000)
                else:
                    call()
    finally:
        connection.close()
        server.shutdown()
        server.server_close()
    return times


def oversized():
    """Two images not to decode whole: a 7,000x7,000 PNG and an 8,000x6,000 JPEG of a digit."""
    images = []
    for size, kind in (((7000, 7000), "PNG"), ((8000, 6000), "JPEG")):
        image = Image.new("L", size, 255)
        ImageDraw.Draw(image).line([(2000, 1500), (5000, 1500), (3000, 4500)], fill=0, width=400)
        buffer = io.BytesIO()
        image.save(buffer, format=kind)
        images.append(buffer.getvalue())
    return images


# A student at the page: a digit drawn in a second, its answer read in one.
DRAW_SECONDS, LOOK_SECONDS = 1.0, 1.0


class Classroom:
    """The clients of ``load_test``, each a thread, against the page's server at ``port`` until
    ``end`` (time.monotonic); what they saw is kept in ``drawn``, ``refused`` and
    ``idle_opened``."""

    def __init__(self, port, end, look):
        self.port, self.end, self.look = port, end, look
        self.drawn, self.refused, self.idle_opened = [], [], 0

    def connect(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def draw(self, start, body):
        """A student at the page: a digit drawn in DRAW_SECONDS, during which the page sends the
        next drawing as soon as the last is answered, then ``look`` seconds looking at the answer;
        ``start``: when to begin."""
        connection = self.connect()
        time.sleep(start)
        while time.monotonic() < self.end:
            digit_end = time.monotonic() + DRAW_SECONDS
            while time.monotonic() < min(digit_end, self.end):
                sent = time.perf_counter()
                try:
                    connection.request("POST", "/predict", body, {"Content-Type": "image/png"})
                    response = connection.getresponse()
                    maps = b'"inside"' in response.read()
                    self.drawn.append((response.status, (time.perf_counter() - sent) * 1000, maps))
                # no answer at all
                except OSError as e:
                    self.drawn.append(
                        (type(e).__name__, (time.perf_counter() - sent) * 1000, False)
                    )
                    connection.close()
            time.sleep(self.look)

    def send_oversized(self, image):
        """One image too large to decode whole, once every student has started."""
        time.sleep(2.5)
        connection = self.connect()
        try:
            connection.request("POST", "/predict", image)
            self.refused.append(connection.getresponse().status)
        except OSError as e:
            self.refused.append(type(e).__name__)
        connection.close()

    def hold_idle(self):
        """A connection that sends nothing, opened again as soon as the server closes it."""
        while time.monotonic() < self.end:
            with socket.create_connection(("127.0.0.1", self.port)) as connection:
                self.idle_opened += 1
                connection.settimeout(max(0.1, self.end - time.monotonic()))
                # b"" when the server closes it
                with contextlib.suppress(OSError):
                    connection.recv(1)


def load_test(run_dir, seconds, clients, idle, look=LOOK_SECONDS):
    """The page's server (``predict.py --serve``, a process of its own) under load; returns the
    numbers. ``look=0``: every client draws without a pause, the most a server can be asked."""
    script = str(Path(__file__).with_name("predict.py"))
    command = [sys.executable, script, "--serve", "--run", str(run_dir), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(server.stdout.readline().split("http://127.0.0.1:")[1].split()[0])
    body, big = drawing(), oversized()
    room = Classroom(port, time.monotonic() + seconds, look)
    workers = [threading.Thread(target=room.hold_idle) for _ in range(idle)]
    workers += [threading.Thread(target=room.send_oversized, args=(big[k % 2],)) for k in range(4)]
    # the students start apart, within 2 s
    starts = random.Random(0).sample(range(1000), clients)
    workers += [threading.Thread(target=room.draw, args=(2 * k / 1000, body)) for k in starts]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        # predict.py --serve ends on SIGTERM as on Ctrl-C; SIGINT would not do: a job that a
        # script starts in the background (a CI's suites side by side) ignores it, and so do its
        # children
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    # Unix only, so not at the top: bench.py runs on Windows too
    import resource

    # of the server, the one child; bytes on macOS, KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    latencies = [ms for status, ms, _ in room.drawn if status == 200]
    refused = room.refused
    return {
        "seconds": seconds,
        "clients": clients,
        "look_s": look,
        "idle": idle,
        "idle_connections_opened": room.idle_opened,
        "drawings": len(room.drawn),
        "answered": sum(status == 200 and maps for status, _, maps in room.drawn),
        "median_ms": statistics.median(latencies) if latencies else None,
        "p90_ms": statistics.quantiles(latencies, n=10)[-1] if len(latencies) > 1 else None,
        "oversized": {
            str(status): refused.count(status) for status in sorted(set(refused), key=str)
        },
        "server_peak_mb": peak_mb,
    }


def page_bench(args):
    """--page: the endpoint's latency, or with --load the server under a class's load."""
    if args.load:
        load = load_test(args.page, args.load, args.clients, args.idle, args.look)
        result = {"torch": torch.__version__, "cpu": machine.cpu_name(), **load}
        print(
            f"torch {torch.__version__}, {machine.cpu_name()}; predict.py --serve for"
            f" {args.load:g} s under {args.clients} clients drawing, {args.idle} idle connections"
            " and 4 oversized images"
        )
        print(
            f"drawings: {result['answered']} of {result['drawings']} answered, median"
            f" {result['median_ms']:.1f} ms, 90th percentile {result['p90_ms']:.1f} ms"
        )
        print(
            f"oversized images: {result['oversized']} (status: count); idle connections opened:"
            f" {result['idle_connections_opened']}; the server's peak memory:"
            f" {result['server_peak_mb']:.0f} MB"
        )
        return result
    times = page_times(args.page, args.requests)
    medians = {key: statistics.median(t) for key, t in times.items()}
    requests = times["request_ms"]
    p90 = statistics.quantiles(requests, n=10)[-1] if len(requests) > 1 else medians["request_ms"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine.cpu_name()}")
    print(
        f"POST /predict with the maps, {args.requests} requests of a 280x280 drawing over loopback:"
        f" median {medians['request_ms']:.1f} ms, 90th percentile {p90:.1f} ms"
    )
    print(
        f"predict.answer in process, without the maps: median {medians['answer_ms']:.1f} ms"
        f" (the request takes {medians['request_ms'] / medians['answer_ms']:.2f}x)"
    )
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": machine.cpu_name(),
        "requests": args.requests,
        "median_ms": medians,
        "request_p90_ms": p90,
    }
