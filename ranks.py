"""The processes a run is spread over under torchrun, and what they tell each other.

torchrun starts every rank with RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE set, and serves
a key-value store that they reach through ``torch.distributed.rendezvous``. Rank 0 makes the run
folder and gives it to the others; then every rank takes the next job from a counter in the store
whenever it is free, so each job is trained exactly once, and rank 0 waits for the others to
print the run's table.
"""

import json
import os
import socket
import time
from pathlib import Path

import torch.distributed

import cli


class RanksLost(Exception):
    """The store that torchrun's ranks share has closed: the process that served it has ended."""


class Ranks:
    """The processes a run is spread over: just this one (``python main.py``), or torchrun's ranks.
    Waits poll the store, so Ctrl-C and SIGTERM reach a waiting rank at once."""

    def __init__(self, rank=0, world_size=1, local_rank=0, local_world_size=1):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.store = None

    @classmethod
    def from_env(cls):
        """The ranks torchrun describes in the environment; else this one process."""
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        if not all(name in os.environ for name in names):
            return cls()
        return cls(*(int(os.environ[name]) for name in names))

    @property
    def several(self):
        return self.world_size > 1

    @property
    def prefix(self):
        """What each printed line of this rank starts with: its rank, when there are several."""
        return f"rank {self.rank} | " if self.several else ""

    def connect(self):
        """Join the other ranks through torchrun's store (only when there are several)."""
        if self.several:
            self.store, _, _ = next(torch.distributed.rendezvous("env://"))

    def _call(self, method, *args):
        """A call on the store; RanksLost when its server is gone (rank 0, in older torch)."""
        try:
            return getattr(self.store, method)(*args)
        # torch.distributed.DistError, or a plain RuntimeError in older torch
        except RuntimeError as e:
            raise RanksLost(cli.first_line(e)) from None

    def share(self, key, value):
        """Give every rank ``value`` (a string) under ``key``."""
        self._call("set", key, value)
        # a counter can be read without waiting (torch 2.2's stores lack check)
        self._call("add", f"{key} is set", 1)

    def wait(self, key):
        """The string another rank shared under ``key``, once it has."""
        while not self._call("add", f"{key} is set", 0):
            time.sleep(0.05)
        return self._call("get", key).decode()

    def gather(self, key, value):
        """Each rank shares ``value``; rank 0 gets them all, in rank order, the others None."""
        if not self.several:
            return [value]
        self.share(f"{key}/{self.rank}", json.dumps(value))
        if self.rank != 0:
            return None
        return [json.loads(self.wait(f"{key}/{r}")) for r in range(self.world_size)]

    def take(self, count):
        """The indices of the jobs this rank trains, out of ``count``: each is handed to the first
        rank that asks for it, so a rank that finishes early takes the next one, and no job is taken
        twice."""
        if not self.several:
            yield from range(count)
            return
        while (index := self._call("add", "jobs taken", 1) - 1) < count:
            yield index

    def finish(self, trained, failed):
        """Mark this rank done; rank 0 waits for every rank and gets the totals of epochs trained
        and jobs failed over all of them, the others their own."""
        if not self.several:
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
        """Whether this is the first rank to stop early (Ctrl-C, or torchrun ending it because
        another rank failed): that one prints how to continue. Where rank 0 serves the store (older
        torch) and has ended, it was first, or it was killed and no rank can know who is first:
        False either way."""
        if not self.several:
            return True
        try:
            return self._call("add", "ranks stopped", 1) == 1
        except RanksLost:
            return False

    def run_folder(self):
        """The run folder rank 0 gives the others (``give_run_folder``), once it has; None when rank
        0 could not start the run, or has ended: it has said why."""
        try:
            folder = self.wait("run folder")
        except RanksLost:
            return None
        return Path(folder) if folder else None

    def give_run_folder(self, run_dir):
        """Rank 0: give the other ranks the run folder, or None when the run cannot start."""
        if self.several:
            self.share("run folder", "" if run_dir is None else str(run_dir))

    def record(self, device, threads):
        """What config.json keeps of this rank: where it ran and how."""
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            "device": str(device),
            "threads": threads,
        }

    def resume_command(self, run_dir):
        """The command that continues the run, launched the way this one was."""
        if not self.several:
            return cli.command("python", "main.py", "--resume", run_dir)
        if self.world_size == self.local_world_size:  # one machine
            launch = ("torchrun", "--standalone", f"--nproc-per-node={self.local_world_size}")
            return cli.command(*launch, "main.py", "--resume", run_dir)
        return "torchrun [the same launch options] " + cli.command("main.py", "--resume", run_dir)
