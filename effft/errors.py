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
