"""The command line's parts beside its Typer surface (``reconciler.cli``): how ``down`` stops
a running reconciler, how ``up`` supervises its gate child, how signals stop the loop, and the
text shown in the terminal."""


class Refused(Exception):
    """What was asked cannot be done; the message is the one line that says why (exit 1)."""
