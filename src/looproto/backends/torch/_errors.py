"""The torch backend's own error, and torch's long errors made into short looproto ones.

`NonFiniteError` (raised with `nan_check`), `first_line` of an exception (torch's run
to dozens of lines; also used for option and process-group errors), and the message
for a graph break under `fullgraph=True`, which names the user's frames only.
"""

from __future__ import annotations

import os

from looproto import errors

# Frames in this package's files are looproto's own (the graph-break message leaves them out).
_PACKAGE_DIR = os.path.join(os.path.dirname(__file__), "")


class NonFiniteError(errors.NonFiniteError):
    """A step's outputs became NaN or infinite (raised with `nan_check`).

    A `looproto.NonFiniteError`: `looproto train` exits with status 5 for it too.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's run to dozens of lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def graph_break_message(step_name: str, err: BaseException) -> str:
    text = str(err)
    frames = [line.strip() for line in text.splitlines() if line.strip().startswith("File ")]
    # Dynamo lists the frames outermost first; leave out looproto's own.
    user = [f for f in frames if _PACKAGE_DIR not in f]
    where = ""
    if user:
        where = f" ({user[0]}" + (f"; inside {user[-1]}" if len(user) > 1 else "") + ")"
    hints = []
    if "backward" in text or "autograd" in text:
        hints.append(
            "`backward()` and `torch.autograd.grad` are traced only with "
            '`backend_options={"trace_autograd": True}`.'
        )
    if "optim" in text and ("graph_break()" in text or "marked as skipped" in text):
        hints.append(
            "`torch.optim` optimizers always break the graph around `step()` and "
            "`zero_grad()` (by design); update the parameters with tensor ops instead."
        )
    hints.append("Set `fullgraph=False` to allow graph breaks.")
    return (
        f"`{step_name}` cannot be compiled as one graph (`fullgraph=True`): "
        f"{first_line(err)}{where}. " + " ".join(hints)
    )
