"""Runs ``clipft run ...`` in this process and sends it a signal right after
optimizer step K (``python fault_driver.py K SIGNAL clipft-args...``), so the
fault tests can kill a run at an exact point. SIGKILL dies at once, like a
pre-empted machine; SIGTERM/SIGINT/SIGHUP go through clipft's handlers.
``SIGNAL:parent`` sends it to the parent process instead (a sweep running the
run as a member) and waits until the parent has passed it on."""
import os
import signal
import sys
import time

from clipft.engine import session


def main():
    kill_step, (name, _, to) = int(sys.argv[1]), sys.argv[2].partition(":")
    sig, pid = getattr(signal, name), (os.getppid() if to == "parent" else os.getpid())
    real = session.MetricsLog.on_step_end
    got, handle = [], session.StopSignals._handle

    def record(self, signum, frame):
        got.append(signum)
        handle(self, signum, frame)
    session.StopSignals._handle = record

    def on_step_end(self, s):
        real(self, s)
        if s.stepped and s.step == kill_step:
            os.kill(pid, sig)
            deadline = time.monotonic() + 120
            while to == "parent" and not got and time.monotonic() < deadline:
                time.sleep(0.01)    # the step does not end before the signal is back

    session.MetricsLog.on_step_end = on_step_end
    from clipft.cli import cli
    cli(sys.argv[3:], prog_name="clipft")


if __name__ == "__main__":
    main()
