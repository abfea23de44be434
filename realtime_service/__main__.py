"""`python -m realtime_service` is the same CLI as the console script."""

from realtime_service.cli import main

raise SystemExit(main())
