"""The one console all user-facing output goes through."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def adopt_lightning_logging() -> None:
    """Lightning adds a stream handler of its own on import; where the root logger already has
    ours, drop Lightning's so each message is printed once, through our console."""
    import logging

    import lightning  # noqa: F401 - the import is what adds the handler

    # Lightning advertises its cloud logger whenever a Trainer is made; effft's loggers are the
    # recipe's `loggers:`, so the tip is noise in every run
    # (lightning_utilities logs rank-zero messages through one of these two loggers)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        tip = logging.getLogger(name)
        if not any(isinstance(f, _NoLitLoggerTip) for f in tip.filters):
            tip.addFilter(_NoLitLoggerTip())
    root = logging.getLogger()
    if root.handlers:
        logging.getLogger("lightning").handlers.clear()
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(root.level)


class _NoLitLoggerTip:
    """A logging filter that drops Lightning's "try installing litlogger" tip, and nothing else."""

    def filter(self, record: object) -> bool:
        return "litlogger" not in str(getattr(record, "msg", ""))
