"""Summarise py-spy's collapsed stacks (`bench/run_gpu.sh` run `bins_nogc_pyspy`: `py-spy record --format raw
--threads --idle`): samples per thread, and for the thread that runs the autograd backward (the one whose stacks
hold `BackwardCFunction.apply`) how many samples fall in Python and on which lines they end. A line that holds a
few PyTorch calls and still gathers many samples is time spent inside them, waiting included. One JSON line.

    python3 bench/pyspy_summary.py pyspy.txt [label]
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def summary(text: str, top: int = 15) -> dict:
    threads: collections.Counter[str] = collections.Counter()
    stacks: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        threads[frames[0]] += int(count)
        stacks.append((frames, int(count)))
    backward = collections.Counter(f[0] for f, n in stacks if any("BackwardCFunction.apply" in x for x in f))
    name = backward.most_common(1)[0][0] if backward else None
    own = [(f, n) for f, n in stacks if f[0] == name]
    python = sum(n for f, n in own if len(f) > 1)
    leaves: collections.Counter[str] = collections.Counter()
    for frames, n in own:
        if len(frames) > 1:
            leaves[frames[-1]] += n
    return {"threads": dict(threads.most_common()), "backward_thread": name,
            "backward_thread_samples": sum(n for _, n in own), "backward_thread_in_python": python,
            "backward_thread_top_lines": dict(leaves.most_common(top))}


if __name__ == "__main__":
    out = {"run": sys.argv[2] if len(sys.argv) > 2 else "pyspy_summary", **summary(Path(sys.argv[1]).read_text())}
    print(json.dumps(out))
