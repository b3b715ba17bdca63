"""Independent benchmark jobs, in separate processes or one after another."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm import tqdm


def run_jobs(function: Callable[..., Any], calls: Sequence[tuple], jobs: int, desc: str, progress: bool) -> list:
    """function(*call) for each call, in order: in `jobs` spawned processes (one CPU thread each, so the
    results are the same as in one process) when jobs > 1, else here."""
    if jobs <= 1:
        return [function(*call) for call in tqdm(calls, desc=desc, disable=not progress)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(function, *call) for call in calls]
        return [future.result() for future in tqdm(futures, desc=desc, disable=not progress)]
