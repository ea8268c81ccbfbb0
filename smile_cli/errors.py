"""The errors smile reports to its users, each with the process exit code it maps to."""


class SmileError(Exception):
    """A failure explained in one line; the CLI prints it and exits with `exit_code`."""

    exit_code = 1


class InputError(SmileError):
    """Bad arguments or bad inputs: nothing is written, the CLI exits 2."""

    exit_code = 2


class Interrupted(SmileError):
    """Ctrl-C or SIGTERM: the staging folder is kept for --resume; the CLI exits 130."""

    exit_code = 130
