"""`enable_logging()`: looproto's progress lines in a program's output, with one call."""

from __future__ import annotations

import logging
import sys
from typing import IO, Final

from looproto.errors import ConfigError, value_repr

__all__ = ["enable_logging"]

_LOGGER: Final = "looproto"


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `enable_logging` adds (recognised, so a second call replaces it).

    It steps aside once the program configures logging later (a library it imports
    may call `logging.basicConfig`): then the root's handlers print the records, once.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        super().emit(record)


def enable_logging(level: int | str = logging.INFO, *, stream: IO[str] | None = None) -> None:
    """Prints looproto's log lines -- progress, evaluations, checkpoints -- at `level`.

    The Controller logs one line per inner loop (step, steps/s, ETA, outputs), one
    per evaluation and one per checkpoint, to the `looproto` logger; Python shows none
    of them until a program configures logging. This sets that logger's level and,
    when the program has configured no handler of its own (on the root logger), adds
    one writing plain lines to `stream` (standard error by default). With a handler
    configured (`logging.basicConfig`, a framework's), now or later, the lines go there
    instead.
    Calling it again changes the level (and the stream).

    `looproto train` and the examples call it; a script of your own calls it once::

        looproto.enable_logging()  # or enable_logging("WARNING") for problems only

    Args:
        level: A `logging` level (`logging.INFO`) or its name (`"INFO"`, `"DEBUG"`).
        stream: Where the lines go when looproto adds its own handler.

    Raises:
        ConfigError: `level` is not a logging level.
    """
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ConfigError(
                f"`level` must be a logging level such as 'INFO' or logging.DEBUG; received "
                f"level={level!r}."
            )
        level = resolved
    elif isinstance(level, bool) or not isinstance(level, int):
        raise ConfigError(
            f"`level` must be a logging level such as 'INFO' or logging.DEBUG; received "
            f"level={value_repr(level)}."
        )
    logger = logging.getLogger(_LOGGER)
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(handler)
    if logging.getLogger().handlers:
        return  # the program's own handlers print the records
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
