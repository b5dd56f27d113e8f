"""The one console all user-facing output goes through."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
