"""Subcommands of the ``ldm-sdk`` command line, one module each (registered in ``ldm_sdk.cli.COMMANDS``)."""
