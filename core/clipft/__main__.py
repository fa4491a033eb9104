"""``python -m clipft ...`` is the ``clipft`` command (for launchers such as torchrun)."""
from clipft.cli import main

main()
