"""ranks.py: torchrun's ranks as the environment describes them, and what they share through a
store (here an in-memory one, the ranks threads)."""

import socket
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from ranks import Ranks


def test_the_ranks_come_from_torchruns_environment_else_this_one_process(monkeypatch):
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    alone = Ranks.from_env()  # one of the four names missing: not under torchrun
    assert (alone.rank, alone.world_size, alone.several, alone.prefix) == (0, 1, False, "")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    ranks = Ranks.from_env()
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size) == (3, 4, 1, 2)
    assert ranks.several and ranks.prefix == "rank 3 | "


def together(world_size, work):
    """``work(ranks)`` in one thread per rank, the ranks sharing one store; {rank: its result}."""
    store, results = dist.HashStore(), {}

    def run(r):
        ranks = Ranks(r, world_size, r, world_size)
        ranks.store = store
        results[r] = work(ranks)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_rank_0_gathers_every_ranks_value_in_rank_order_and_the_others_none():
    results = together(3, lambda ranks: ranks.gather("seconds", {"rank": ranks.rank}))
    assert results == {0: [{"rank": 0}, {"rank": 1}, {"rank": 2}], 1: None, 2: None}


def test_the_other_ranks_wait_for_the_run_folder_rank_0_gives_or_its_refusal():
    def work(ranks):
        if ranks.rank == 0:
            ranks.give_run_folder(Path("runs/my run"))
        return ranks.run_folder()

    assert together(3, work) == {r: Path("runs/my run") for r in range(3)}

    def refused(ranks):
        if ranks.rank == 0:
            ranks.give_run_folder(None)
        return ranks.run_folder()

    assert together(2, refused) == {0: None, 1: None}


def test_only_the_first_rank_to_stop_is_first():
    stops = together(3, lambda ranks: ranks.first_to_stop())
    assert sorted(stops.values()) == [False, False, True]
    assert Ranks().first_to_stop()  # alone, it is first


def test_the_record_says_where_a_rank_ran_and_how():
    record = Ranks(2, 4, 0, 2).record(torch.device("cpu"), 3)
    assert record == {"rank": 2, "host": socket.gethostname(), "device": "cpu", "threads": 3}


def test_the_resume_command_is_launched_the_way_the_run_was():
    run = Path("runs/my run")
    assert Ranks().resume_command(run) == "python main.py --resume 'runs/my run'"
    assert Ranks(1, 2, 1, 2).resume_command(run) == (
        "torchrun --standalone --nproc-per-node=2 main.py --resume 'runs/my run'"
    )
    assert Ranks(3, 4, 1, 2).resume_command(run) == (
        "torchrun [the same launch options] main.py --resume 'runs/my run'"
    )
