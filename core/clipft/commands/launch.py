"""``clipft run --nproc N``: the same command under torchrun's elastic
launcher on this machine (``--standalone``: a local rendezvous on a free
port), so users need not spell ``torchrun --nproc-per-node N -m clipft run``.
On several machines, call torchrun yourself (docs/scaling.md)."""
from __future__ import annotations

import os
import sys

from clipft.errors import ClipftUsageError


def without_nproc(argv: list[str]) -> list[str]:
    out, rest = [], iter(argv)
    for a in rest:
        if a == "--nproc":
            next(rest, None)   # its value
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``clipft`` with ``argv`` (minus ``--nproc``) on ``nproc`` processes
    through torchrun's own launcher, in this process; returns the exit code of
    the first rank that failed (the launcher stops the others), else 0. The
    ranks print their own errors; the launcher's traceback is left out.

    A SIGTERM, SIGINT or SIGHUP to the launcher reaches the ranks (torchrun
    forwards it), which checkpoint and stop as a single process does; rank 0
    says how to resume, and the launcher exits 128 + the signal's number
    (143 for SIGTERM), as a shell reports a process a signal stopped. The
    launcher's log folder (torchrun makes one in /tmp per job) is removed."""
    import logging
    import shutil
    import tempfile
    import warnings

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise ClipftUsageError(f"--nproc {nproc}: must be >= 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ClipftUsageError("--nproc inside a torchrun job: torchrun already started the processes")
    logs = tempfile.mkdtemp(prefix="clipft-torchrun-")
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", f"--log-dir={logs}", "-m", "clipft",
                       *without_nproc(argv)])
    # torchrun's own loggers set their levels, so each is quietened by name
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # torchrun's notes on its own defaults (OMP threads, deprecations)
            # are nothing a clipft user can act on
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            run(args)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if isinstance(code, int) and code in (130, 143, 129):   # the ranks stopped on a signal, resumable
            return code
        print(f"error: rank {rank} of {nproc} exited with code {code}; the others were stopped",
              file=sys.stderr)
        return code if isinstance(code, int) and code > 0 else 1
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    return 0
