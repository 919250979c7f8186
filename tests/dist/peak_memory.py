"""pretrain/train.py as it is, under the torch profiler's memory events: each rank's peak of live tensor
bytes on CPU, the number torch.cuda.max_memory_allocated gives on a GPU. Writes {"peak": bytes} per rank
to <--peak-out>.rank<R>.json; the other arguments are the trainer's.

Why not the RSS: it counts the code pages of kernels run for the first time and the allocator's cached
heap, and leaves out pages allocated but not yet touched (DeepSpeed's reduction bucket), so on small
models it says more about the machine than about the plan.
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cromwell.pretrain.train import main


def peak_live_bytes(prof) -> int:
    """The high-water mark of bytes allocated and not yet freed since the profiler started."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


if __name__ == "__main__":
    i = sys.argv.index("--peak-out")
    out = Path(sys.argv[i + 1])
    del sys.argv[i:i + 2]
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    prof.start()  # before anything is built: every tensor's allocation and free is seen
    try:
        main()
    finally:
        prof.stop()
    rank = os.environ.get("RANK", "0")
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"peak": peak_live_bytes(prof),
                                                          "torch_threads": torch.get_num_threads()}))
