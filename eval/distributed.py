"""Split evaluation work across `accelerate launch` processes and merge it back in the original order.

Work is cut into fixed batches BEFORE splitting, and each process takes whole batches. A batch therefore
holds the same images whatever the number of processes, so per-image outputs are bitwise identical to a
single-process run (given the same threads per process), and every metric, computed once on the merged
list, equals the single-process number exactly. Run as usual, or under
`accelerate launch --multi_gpu --num_processes N -m anomaly_assistant.cli eval ...` (also on a machine
without GPUs: processes then talk over gloo) or
`torchrun --nproc_per_node N -m anomaly_assistant.cli eval ...`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def state():
    """Accelerate's PartialState (a plain single process when not launched).

    Without CUDA it is created with `cpu=True`, which is what turns a torchrun-style launch into gloo
    MULTI_CPU processes (accelerate's simple `--cpu` launcher starts one process only without mpirun).
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def is_main_process() -> bool:
    """Whether this process writes results and reports (only one of N may, or files collide)."""
    return state().is_main_process


def num_processes() -> int:
    """How many processes share the work; 1 when run without a launcher."""
    return state().num_processes


def batches(items: Sequence[T], batch_size: int) -> list[list[T]]:
    """Consecutive batches of `batch_size` (the last one shorter)."""
    bs = max(1, int(batch_size))
    return [list(items[i: i + bs]) for i in range(0, len(items), bs)]


def distributed_map(
    fn: Callable[[list[T]], list[R]],
    items: Sequence[T],
    batch_size: int = 1,
    progress: str | None = None,
) -> list[R]:
    """`fn` over batches of `items`, spread over all processes; every process gets all results, in order.

    `fn(batch) -> list` returns one picklable result per item. With one process this is a plain loop.
    """
    from accelerate.utils import gather_object

    st = state()
    work = batches(items, batch_size)
    indices = list(range(len(work)))
    with st.split_between_processes(indices) as mine:
        mine = list(mine)
        bar = None
        if progress and st.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), desc=progress, unit="batch", leave=False)
        local: list[tuple[int, list[R]]] = []
        for i in mine:
            out = list(fn(work[i]))
            if len(out) != len(work[i]):
                raise ValueError(f"batch {i}: {len(out)} results for {len(work[i])} items")
            local.append((i, out))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    merged: list[tuple[int, list[R]]] = gather_object(local) if st.num_processes > 1 else local
    merged.sort(key=lambda pair: pair[0])
    if [i for i, _ in merged] != indices:
        raise RuntimeError("distributed evaluation lost or duplicated batches")
    return [r for _, out in merged for r in out]


def wait_for_everyone() -> None:
    """Barrier across processes, for a step that must not start before every process got there."""
    state().wait_for_everyone()


def main_process_info() -> dict[str, Any]:
    """What goes into a result file about how it was computed."""
    st = state()
    return {"num_processes": st.num_processes, "device": str(st.device)}
