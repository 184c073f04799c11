"""``python -m shardq.cli …`` is the ``shardq`` command."""

from shardq.cli import main

raise SystemExit(main())
