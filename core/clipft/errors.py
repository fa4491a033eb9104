"""Error types that the CLI maps to exit codes (2: usage/config, 1: runtime)."""


class ClipftError(Exception):
    """A runtime failure with a message meant for the user (exit code 1)."""

    exit_code = 1


class ClipftUsageError(ClipftError):
    """Bad command line, config, option or component choice (exit code 2)."""

    exit_code = 2


class PluginConflictError(ClipftUsageError):
    """Two distributions registered the same component name in the same kind.

    Raised when that name is looked up (not while plugins load), naming both."""


class Interrupted(ClipftError):
    """A command stopped on a signal (exit 128 + its number, as a shell reports
    it: 130 for SIGINT/Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RunInterrupted(Interrupted):
    """Training stopped on a signal after writing a resumable checkpoint."""
