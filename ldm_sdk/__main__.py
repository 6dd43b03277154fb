"""``python -m ldm_sdk ...`` runs the ``ldm-sdk`` command line."""

from ldm_sdk.cli import main

raise SystemExit(main())
