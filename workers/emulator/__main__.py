"""``python -m tandem.workers.emulator``: serve one emulated vLLM engine."""

from tandem.workers.emulator import cli

raise SystemExit(cli.main())
