"""Make the example importable when it is tested without being installed
(``pytest examples/clipft-bitfit-example/tests`` from a checkout)."""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
