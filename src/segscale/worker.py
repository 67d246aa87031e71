"""The per-process entry point under torchrun: `python -m segscale.worker train RUN_DIR`.

Users launch through `segscale train --workers N`, which validates everything first and then starts
this module N times; or directly: `torchrun --nproc-per-node N -m segscale.worker train RUN_DIR`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from segscale.errors import SegscaleError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segscale.worker")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("run_dir", type=Path)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("evaluate")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--split", default="test")
    e.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from segscale import engine

    if args.command == "train":
        return exit_code(
            engine.train_worker, args.run_dir, resume=args.resume, progress=not args.no_progress
        )
    return exit_code(engine.evaluate_worker, args.run_dir, args.split, args.out)


def exit_code(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """Run a worker's job; user errors print one line (exit 2), a preemption exits 75."""
    from segscale.train import PREEMPTED_EXIT_CODE, Preempted

    try:
        fn(*args, **kwargs)
    except SegscaleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def exit_now(code: int) -> None:
    """End a torchrun-launched process once its work is done and its files are written: flush, then
    skip interpreter teardown. A 2-worker CI run once aborted at the very end with 'terminate called
    without an active exception' (SIGABRT, no Python traceback): C++ threads destroyed during
    teardown, after the process group was already closed. Nothing left to do needs teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
