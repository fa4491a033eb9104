"""Runs ``clipft ...`` in this process with a hook that sends a signal at an
exact point, so that the signal tests do not race the command:

- ``python signal_driver.py export SIGNAL clipft-args...``: to this process,
  once the export has written its weights into its temporary folder;
- ``python signal_driver.py sweep MEMBER K SIGNAL clipft-args...``: the member
  run whose ``--out`` ends with MEMBER runs through fault_driver.py, which
  sends SIGNAL to this sweep right after the member's optimizer step K.
"""
import os
import signal
import sys
from pathlib import Path


def main():
    if sys.argv[1] == "export":
        from clipft.commands import export
        sig, args = getattr(signal, sys.argv[2]), sys.argv[3:]
        real = export._save

        def save(*a, **k):
            real(*a, **k)
            os.kill(os.getpid(), sig)
        export._save = save
    else:
        from clipft.commands import sweep
        member, step, sig, args = *sys.argv[2:5], sys.argv[5:]
        real = sweep.MemberSignals.call

        def call(self, cmd, env):
            if "--out" in cmd and cmd[cmd.index("--out") + 1].endswith(member):
                # cmd is [python, -m, clipft.cli, ...]
                cmd = [cmd[0], str(Path(__file__).with_name("fault_driver.py")), step, f"{sig}:parent", *cmd[3:]]
            return real(self, cmd, env)
        sweep.MemberSignals.call = call
    from clipft.cli import cli
    cli(args, prog_name="clipft")


if __name__ == "__main__":
    main()
