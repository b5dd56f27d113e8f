"""Errors a user can cause. The CLI prints them as one message, without a traceback."""


class EffftError(Exception):
    """A problem with the user's input (a file, a recipe key, a weight source).

    The message says what is wrong, names the file or key, and what to do. `exit_code` is what
    the command line exits with.
    """

    exit_code = 1


class RecipeError(EffftError):
    """A recipe (or a `--set` override) that does not validate."""

    exit_code = 2


class UnknownModelError(EffftError, KeyError):
    """A model name that is not one of ours."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsError(EffftError):
    """Weights that cannot be had, or do not fit the model."""


class Interrupted(EffftError):
    """The command was stopped from outside: Ctrl-C (exit 130) or SIGTERM (exit 143), the codes a
    shell gives a process ended by those signals. The message says what was left and how to go on."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def user_error(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for an error the user caused, None for a bug.

    An OSError is a path given by the user that cannot be made, read or written: no permission,
    a file where a folder is wanted (or the reverse), a full disk.
    """
    if isinstance(exc, EffftError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return (f"{where}{exc.strerror or exc}: check the path given (a folder where a folder is wanted, a file "
                "where a file is), its permissions and the free space"), 1
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    return None
