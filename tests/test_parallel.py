"""torchrun: a run's jobs spread over ranks, each job trained once, with the numbers of a single
process.

The ranks here are real torchrun processes on this machine's CPU (two, one thread each), on a
small subset; the job queue's hand-out is also checked in-process with a store shared by threads.
"""

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, epochs_without_time, run_main

import cli
import machine
import main
import runs
from model import MODELS
from ranks import Ranks

JOBS = [("lenet5", 0), ("mlp", 0), ("lenet5", 1), ("mlp", 1)]
SETTINGS = (
    "--model",
    "lenet5,mlp",
    "--seeds",
    "0,1",
    "--epochs",
    "3",
    "--train-limit",
    "5000",
    "--test-limit",
    "500",
    "--device",
    "cpu",
)
# each of two ranks' share of the cores: torchrun's default --threads
THREADS = max(1, machine.cpu_cores() // 2)
EPOCH_LINE = re.compile(r"^rank (\d) \| (\w+) +seed (\d) epoch (\d)/3 ")


@pytest.fixture(scope="module")
def alone(mnist_dir, tmp_path_factory):
    """The same jobs trained by one process with a rank's threads: what every rank must
    reproduce."""
    out = tmp_path_factory.mktemp("alone")
    assert run_main(mnist_dir, out, *SETTINGS, "--threads", str(THREADS)) == 0
    return out / "run"


def torchrun(mnist_dir, out_dir, *extra):
    """``torchrun --standalone --nproc_per_node=2 main.py`` on the small run, its output piped line
    by line."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "main.py"),
        "--data-dir",
        str(mnist_dir),
        "--out-dir",
        str(out_dir),
        "--run-name",
        "run",
        *SETTINGS,
        *extra,
    ]
    # as in many containers: a print is then two writes, unless...
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out_dir, env=env
    )


def trained_epochs(output):
    """(rank, model, seed, epoch) of every epoch line in torchrun's output."""
    return [
        (int(m[1]), m[2], int(m[3]), int(m[4]))
        for m in map(EPOCH_LINE.match, output.splitlines())
        if m
    ]


def assert_same_numbers(run_dir, alone):
    """Every job's rows (without seconds) and final weights equal those of the single process."""
    for name, seed in JOBS:
        job, reference = (runs.job_dir(d, name, seed, per_seed=True) for d in (run_dir, alone))
        assert epochs_without_time(job / "stats.json") == epochs_without_time(
            reference / "stats.json"
        )
        weights = torch.load(job / "last.pt", weights_only=True)["model"]
        expected = torch.load(reference / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(weights[k], expected[k]) for k in expected), f"{name} seed {seed}"


def test_two_ranks_train_each_job_once_with_the_numbers_of_one_process(mnist_dir, tmp_path, alone):
    process = torchrun(mnist_dir, tmp_path)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    epochs = trained_epochs(output)
    assert sorted((name, seed, epoch) for _, name, seed, epoch in epochs) == sorted(
        (name, seed, epoch) for name, seed in JOBS for epoch in (1, 2, 3)
    ), output
    for name, seed in JOBS:  # one rank trained the whole job
        assert len({rank for rank, n, s, _ in epochs if (n, s) == (name, seed)}) == 1
    config = runs.read_json(tmp_path / "run" / "config.json")
    assert config["world_size"] == 2 and config["threads"] == THREADS
    assert [(r["rank"], r["device"], r["threads"]) for r in config["ranks"]] == [
        (0, "cpu", THREADS),
        (1, "cpu", THREADS),
    ]
    # one table, once every job is done
    table = output[output.index("test acc  val acc  minutes") :].splitlines()[1:5]
    assert output.count("test acc  val acc  minutes") == 1 and [
        line.split()[:3] for line in table
    ] == [[name, str(seed), "3"] for name, seed in JOBS]
    assert_same_numbers(tmp_path / "run", alone)


def rank_pid(launcher, rank):
    """The process id of one of torchrun's ranks (Linux: its children and their environments)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    raise AssertionError(f"torchrun has no rank {rank}")


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="finds a rank's process through /proc"
)
@pytest.mark.parametrize("stop", ["SIGKILL to rank 1", "Ctrl-C to torchrun"])
def test_a_stopped_run_loses_no_epoch_and_resume_trains_exactly_what_is_left(
    mnist_dir, tmp_path, alone, stop, capsys
):
    process = torchrun(mnist_dir, tmp_path)
    seen = []
    # stop when rank 1 has completed an epoch of a LeNet-5 job (~0.5 s each)
    for line in process.stdout:
        seen.append(line)
        if line.startswith("rank 1 | lenet5"):
            if stop == "SIGKILL to rank 1":
                os.kill(rank_pid(process, 1), signal.SIGKILL)
            else:
                process.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends torchrun
            break
    output = "".join(seen) + process.communicate(timeout=120)[0]
    assert process.returncode != 0
    run_dir = tmp_path / "run"
    resume = cli.command(
        "torchrun", "--standalone", "--nproc-per-node=2", "main.py", "--resume", run_dir
    )
    assert output.count(f"continue with: {resume}") == 1, output
    if stop == "Ctrl-C to torchrun":
        assert all(
            f"rank {r} | interrupted: completed epochs are saved" in output for r in (0, 1)
        ), output

    # epochs complete on disk: last.pt marks them (SIGTERM may land between a job's writes)
    before = {}
    for name, seed in JOBS:
        job, before[name, seed] = runs.job_dir(run_dir, name, seed, per_seed=True), 0
        if (job / "last.pt").exists():
            before[name, seed] = torch.load(job / "last.pt", weights_only=True)["epoch"]
            assert len(runs.read_stats(job / "stats.json")["epochs"]) >= before[name, seed]
    for _, name, seed, epoch in trained_epochs(output):
        assert before[name, seed] >= epoch  # every epoch reported done is on disk
    _, name, seed, _ = trained_epochs("".join(seen))[-1]
    assert before[name, seed] < 3  # rank 1's job was cut short

    capsys.readouterr()
    # plain python, this time
    assert main.main(["--resume", str(run_dir), "--threads", str(THREADS), "--quiet"]) == 0
    resumed = re.findall(r"^(\w+) +seed (\d) epoch (\d)/3 ", capsys.readouterr().out, re.M)
    # exactly what was left
    expected = [(n, s, e) for n, s in JOBS for e in range(before[n, s] + 1, 4)]
    assert [(n, int(s), int(e)) for n, s, e in resumed] == expected
    assert_same_numbers(run_dir, alone)


def share_jobs(world_size, count, seconds_per_job):
    """Ranks in threads sharing one in-memory store, each "training" a job by sleeping: the job
    indices each rank took, and what rank 0's ``finish`` returned (the totals over all ranks, once
    every rank is done)."""
    store, taken, totals = dist.HashStore(), {}, {}

    def rank(r):
        ranks = Ranks(r, world_size, r, world_size)
        ranks.store = store
        taken[r] = []
        for index in ranks.take(count):
            taken[r].append(index)
            time.sleep(seconds_per_job[r])
        totals[r] = ranks.finish(len(taken[r]), 0)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return taken, totals[0]


def test_jobs_go_to_whichever_rank_is_free_each_exactly_once():
    # rank 1's jobs are slow: rank 0 takes the rest
    taken, totals = share_jobs(2, 8, seconds_per_job=[0.01, 0.5])
    assert sorted(taken[0] + taken[1]) == list(range(8))
    assert len(taken[0]) >= 6 and len(taken[1]) <= 2  # a fixed stride would give each rank 4
    assert totals == (8, 0)  # rank 0, done first, waited for rank 1 before counting

    # more ranks than jobs: the extra ones take none
    taken, totals = share_jobs(5, 3, seconds_per_job=[0.01] * 5)
    assert sorted(sum(taken.values(), [])) == [0, 1, 2] and totals == (3, 0)


def test_each_rank_of_a_machine_trains_on_gpu_local_rank_modulo_the_gpus(monkeypatch):
    fake_gpus = {
        "is_available": True,
        "device_count": 3,
        "get_device_capability": (9, 0),
        "get_arch_list": ["sm_90"],
    }
    for name, value in fake_gpus.items():  # three sm_90 GPUs, as torch.cuda would report them
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value: value)
    assert [machine.pick_device("auto", local_rank) for local_rank in range(5)] == [
        torch.device("cuda", i)
        for i in (0, 1, 2, 0, 1)  # several ranks may share a GPU
    ]
    assert machine.pick_device("cuda", 4) == torch.device("cuda", 1)
    # a GPU named by the user is kept
    assert machine.pick_device("cuda:2", 4) == torch.device("cuda", 2)
    assert machine.pick_device("auto") == torch.device("cuda")  # python main.py: as before


def test_ranks_take_the_slowest_models_first_and_one_process_keeps_seed_order():
    cfg = {"seeds": [0, 1], "model": ["lenet5", "mlp", "lenet5_reg"]}
    assert runs.jobs(cfg) == [
        (name, seed) for seed in (0, 1) for name in ("lenet5", "mlp", "lenet5_reg")
    ]
    assert runs.jobs(cfg, slowest_first=True) == [
        (name, seed) for name in ("lenet5_reg", "lenet5", "mlp") for seed in (0, 1)
    ]
    assert sorted(runs.SLOWEST_FIRST) == sorted(MODELS)  # every model has its place in the order


class RecordedWrites(io.RawIOBase):
    """A raw stream that keeps each write it is given, as a console or pipe would receive them."""

    def __init__(self):
        self.writes = []

    def writable(self):
        return True

    def write(self, data):
        self.writes.append(bytes(data))
        return len(data)


def test_each_printed_line_is_one_write_so_the_lines_of_ranks_never_interleave(monkeypatch):
    raw = RecordedWrites()
    # sys.stdout under PYTHONUNBUFFERED
    unbuffered = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    monkeypatch.setattr(sys, "stdout", unbuffered)
    cli.safe_console()  # what every script does first, when run
    print("rank 1 | lenet5     seed 1 epoch 3/3 | train loss 0.1179")
    print("rank 1 | interrupted: completed epochs are saved", flush=True)
    assert raw.writes == [
        b"rank 1 | lenet5     seed 1 epoch 3/3 | train loss 0.1179\n",
        b"rank 1 | interrupted: completed epochs are saved\n",
    ]
