"""The one console all user-facing output goes through."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def adopt_lightning_logging() -> None:
    """Lightning adds a stream handler of its own on import; where the root logger already has
    ours, drop Lightning's so each message is printed once, through our console."""
    import logging

    import lightning  # noqa: F401 - the import is what adds the handler

    root = logging.getLogger()
    if root.handlers:
        logging.getLogger("lightning").handlers.clear()
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(root.level)
