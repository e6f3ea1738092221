"""`python -m looproto`: the `looproto` command (see `looproto.run.cli`)."""

import sys

try:
    from looproto.run.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command itself is imported: nothing began
    print("looproto: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
