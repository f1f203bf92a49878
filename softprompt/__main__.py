"""``python -m softprompt`` runs the CLI."""

from softprompt.cli import main

raise SystemExit(main())
