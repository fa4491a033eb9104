"""One rank of row 10 (benchmarks/fsdp_memory.py): ``clipft run`` as usual,
then this process's peak resident set size written to ``FSDP_PROBE_OUT/rank<R>.json``
(at exit, so whatever the run held at its peak is counted)."""
from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path


def _report():
    from clipft.engine.session import peak_rss_mb
    out = Path(os.environ["FSDP_PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    atexit.register(_report)
    from clipft.cli import main
    sys.argv = ["clipft"] + sys.argv[1:]
    main()
