"""Checkpoint tools on the command line (`sd15 convert`, `inspect`, `diff`): registered by add_commands."""

COMMANDS: dict = {}


def add_commands(sub) -> None:
    """Add the checkpoint tools' subcommands to the `sd15` parser."""
