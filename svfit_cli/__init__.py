"""The `svfit` command. `commands.py` builds the one parser; `server.py` runs the service's roles (`serve`,
`api`, `worker`, `migrate`, `keys`); `client/` talks to a running service over its public HTTP API only.

This package sits above every other one: it is where the roles are started and wired together.
"""

from svfit_cli.commands import main

__all__ = ["main"]
