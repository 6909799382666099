"""``flower-supernode`` as a site runs it: under a memory bound, and gone once its Fleet loop ends.

Flower's SuperNode reads each new run's app bundle (FAB) from the coordinator and unzips its
``pyproject.toml`` to merge the run settings (``flwr.common.config.get_fab_config``) before any
check of the site sees the task; the site's app allow-list (flower_adapter/app_runner.py) comes after.
A FAB whose ``pyproject.toml`` inflates to gigabytes (a zip bomb, a few MB on the wire) would
grow the SuperNode until the machine runs out of memory. So ``cxr-fl-client start`` runs its
SuperNode through this module (``python -m flower_adapter.supernode_main --memory-limit BYTES --
ARGS``), which bounds the process's data memory (``RLIMIT_DATA``: heap and private mappings,
what such a read grows; children inherit it) and then calls Flower's own entry point with ARGS
(``flwr.supernode.cli.flower_supernode``, what the ``flower-supernode`` command runs).

Past the bound, Python raises MemoryError inside the SuperNode; Flower 1.42 catches it in its
Fleet loop, logs it and returns from the loop, but its Runtime API thread would keep the process
alive, doing nothing. This module ends the process then, with :data:`FLEET_LOOP_ENDED_EXIT`,
and client/deploy.py starts a fresh SuperNode: the site keeps serving, the bomb's run gets no
reply. Only the bounded SuperNode is hit: the site's own process (the warm runner) never reads
the FAB's contents, it only hashes them. Reaching the bound is not instant: zipfile grows the
read by concatenation, so a bomb costs the SuperNode CPU time that grows with the square of the
bound (about 6 s for 256 MiB on this project's 2-core machine) before it fails.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

FLEET_LOOP_ENDED_EXIT = 75
"""Exit code of a SuperNode whose Fleet loop ended on an error (e.g. out of memory)."""
DEFAULT_MEMORY_LIMIT = 4 * 1024**3
"""The default bound (bytes) of a SuperNode's data memory. An idle SuperNode uses about 0.21 GB
of it (VmData, measured on flwr 1.42); during a task it also holds the message's arrays and the
reply's (an estimate: twice the model, 0.35 GB for the 175 MB dual teacher), so 4 GiB leaves a
wide margin while a bomb fails long before the machine's memory runs out."""


def limit_memory(limit_bytes: int) -> None:
    """Bound this process's data memory (and its children's) to ``limit_bytes``; 0: no bound."""
    if limit_bytes > 0:
        _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        bound = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (bound, bound))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flower_adapter.supernode_main")
    parser.add_argument("--memory-limit", type=int, default=DEFAULT_MEMORY_LIMIT, help="bytes; 0: none")
    parser.add_argument("supernode_args", nargs=argparse.REMAINDER, help="-- then flower-supernode's")
    args = parser.parse_args(argv)
    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    limit_memory(args.memory_limit)
    sys.argv = ["flower-supernode", *rest]
    from flwr.supernode.cli import flower_supernode

    try:
        flower_supernode()
    except SystemExit as exc:  # Flower's own exits (refusals, Ctrl-C): their codes, unchanged
        _exit(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1))
    except MemoryError:
        print(f"ERROR : the SuperNode ran out of its memory bound ({args.memory_limit} bytes)", flush=True)
        _exit(FLEET_LOOP_ENDED_EXIT)
    print(
        "ERROR : the SuperNode's Fleet loop ended (an error above, e.g. its memory bound was reached); "
        "it stops so that the site can start a fresh one",
        flush=True,
    )
    _exit(FLEET_LOOP_ENDED_EXIT)


def _exit(code: int) -> None:
    """Leave now: Flower's Runtime API thread would otherwise keep the process alive."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
