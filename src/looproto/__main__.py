"""`python -m looproto`: the `looproto` command (see `looproto.cli`)."""

from looproto.cli import main

raise SystemExit(main())
