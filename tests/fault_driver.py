"""Runs ``clipft run ...`` in this process and sends it a signal right after
optimizer step K (``python fault_driver.py K SIGNAL clipft-args...``), so the
fault tests can kill a run at an exact point. SIGKILL dies at once, like a
pre-empted machine; SIGTERM/SIGINT go through clipft's handlers."""
import os
import signal
import sys

from clipft.engine import session


def main():
    kill_step, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
    real = session.MetricsLog.on_step_end

    def on_step_end(self, s):
        real(self, s)
        if s.stepped and s.step == kill_step:
            os.kill(os.getpid(), sig)

    session.MetricsLog.on_step_end = on_step_end
    from clipft.cli import cli
    cli(sys.argv[3:], prog_name="clipft")


if __name__ == "__main__":
    main()
