"""``python -m popcorn <command> ...``: the same as the ``popcorn`` command."""

from popcorn.cli.main import main

raise SystemExit(main())
