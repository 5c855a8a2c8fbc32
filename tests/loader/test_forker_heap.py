"""A loader forked by the template shares the template's heap: its collections do not visit
(and so do not write to, copying their pages) the objects it inherited. The control run,
a plain `os.fork()`, shows that a child's collection does copy them."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import gc, os, sys
from pathlib import Path

from service.loader.forker import fork_sharing_heap

def private_dirty():
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) * 1024

held = [[i] for i in range(1_000_000)]  # ~70 MiB of objects the collector tracks
gc.collect()
read, write = os.pipe()
pid = fork_sharing_heap() if sys.argv[1] == "template" else os.fork()
if pid == 0:
    before = private_dirty()
    gc.collect()
    os.write(write, str(private_dirty() - before).encode())
    os._exit(0)
os.close(write)
os.waitpid(pid, 0)
print(os.read(read, 64).decode())
"""


def _copied_by_a_collection(fork: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, fork], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())


def test_a_loaders_collection_leaves_the_templates_heap_shared() -> None:
    assert _copied_by_a_collection("plain") > 32 << 20  # the control: it copies the heap
    assert _copied_by_a_collection("template") < 4 << 20


GARBAGE = """
import gc, os, weakref

from service.loader.forker import fork_sharing_heap

class Node:
    pass

def fork_and_reap():
    pid = fork_sharing_heap()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

gc.disable()  # only the forks collect
fork_and_reap()
node = Node()
node.self = node  # garbage only a collection frees
gone = weakref.ref(node)
del node
fork_and_reap()
print(gone() is None, gc.get_freeze_count() > 0)
"""


def test_garbage_made_between_forks_is_collected_not_frozen() -> None:
    """The template makes a little garbage serving each fork; frozen, it would stay for good."""
    done = subprocess.run(
        [sys.executable, "-c", GARBAGE], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["True", "True"]


WALKS = """
import gc, os, sys

from service.loader.forker import fork_sharing_heap

walked = []
def profile(frame, event, arg):
    if event == "c_call" and arg is gc.get_freeze_count:
        walked.append(1)

for _ in range(2):
    sys.setprofile(profile)
    pid = fork_sharing_heap()
    if pid == 0:
        os._exit(0)
    sys.setprofile(None)
    os.waitpid(pid, 0)
print(len(walked))
"""


def test_a_fork_never_walks_the_frozen_objects() -> None:
    """`gc.get_freeze_count()` visits every frozen object: ~40 ms of a preloaded
    template's at each fork, on the way to every load."""
    done = subprocess.run([sys.executable, "-c", WALKS], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0"]
