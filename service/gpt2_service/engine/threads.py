"""Who runs torch's parallel kernels: the engine thread alone.

torch's CPU kernels run on an OpenMP team that belongs to the thread calling them; GNU OpenMP
lets a team's idle workers spin between two parallel regions, which is what makes one small
kernel after another cheap, but only while the process has no more OpenMP threads than cores. A
second team (the event loop's thread, or a worker that loaded the model, having run one parallel
kernel) throttles that spinning for every team: workers then sleep between kernels and each of a
decode step's ~1000 kernels pays a wake-up. Measured on 2 cores: a batch-1 forward of GPT-2 small
took 14.7 ms on the only team and 21.6 ms beside a second one.

So a server keeps every other thread single-threaded (``confine_torch_to_the_engine``) and the
engine thread takes the cores (``ENGINE_THREADS``, captured before anything lowers the count).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

ENGINE_THREADS = torch.get_num_threads()  # torch's default for this machine (the cores)


def single_threaded() -> None:
    """Keep torch's kernels on the calling thread (no OpenMP team of its own)."""
    torch.set_num_threads(1)


def confine_torch_to_the_engine(loop: asyncio.AbstractEventLoop) -> None:
    """Make the calling (event loop) thread and the loop's worker threads single-threaded for
    torch, before either runs a kernel; the engine thread sets its own count (``ModelRunner``)."""
    single_threaded()
    loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="gpt2-worker", initializer=single_threaded))
