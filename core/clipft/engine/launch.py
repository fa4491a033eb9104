"""``clipft run --nproc N``: the same command under torchrun's elastic
launcher on this machine (``--standalone``: a local rendezvous on a free
port), so users need not spell ``torchrun --nproc-per-node N -m clipft run``.
On several machines, call torchrun yourself (docs/scaling.md)."""
from __future__ import annotations

import os
import sys

from clipft.errors import ClipftUsageError


def without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``clipft`` with ``argv`` (minus ``--nproc``) on ``nproc`` processes
    through torchrun's own launcher, in this process; returns the exit code of
    the first rank that failed (the launcher stops the others), else 0. The
    ranks print their own errors; the launcher's traceback is left out."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise ClipftUsageError(f"--nproc {nproc}: must be >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ClipftUsageError("--nproc inside a torchrun job: torchrun already started the processes")
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "clipft", *without_nproc(argv)])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        print(f"error: rank {rank} of {nproc} exited with code {code}; the others were stopped",
              file=sys.stderr)
        return code if isinstance(code, int) and code > 0 else 1
    return 0
