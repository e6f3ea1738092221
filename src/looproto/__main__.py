"""`python -m looproto`: the `looproto` command (see `looproto.run.cli`)."""

from looproto.run.cli import main

raise SystemExit(main())
