"""Console entry point: registers every command module, turns user errors into exit code 2."""

import sys

from slimlm.cli.app import app, err_console
from slimlm.errors import SlimlmError

# Each import registers that area's commands on `app`.
from slimlm.cli import (  # noqa: F401,E402
    distill_cmds, eval_cmds, explain_cmds, inspect_cmds, quantize_cmds, recommend_cmds, runtime_cmds, zero_cmds)


def main() -> None:
    """Run the CLI; a SlimlmError (bad input) prints one line and exits 2, never a traceback."""
    try:
        app()
    except SlimlmError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
