"""Console entry point: registers every command module; bad input is one line and exit 2, never a traceback."""

from __future__ import annotations

import sys
import traceback

from rich.text import Text

from slimlm.cli.app import app, err_console
from slimlm.errors import explain
from slimlm.util.process import destroy_process_group_at_exit

# Each import registers that area's commands on `app`.
from slimlm.cli import (  # noqa: F401,E402
    distill_cmds, eval_cmds, explain_cmds, inspect_cmds, quantize_cmds, recommend_cmds, runtime_cmds, zero_cmds)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: the command line) in this process and return its exit code: 2 for bad
    input (a SlimlmError, or a parser, allocator or OS error on bad input: one line), 1 for a bug (one line;
    ``--debug`` prints the traceback), 130 when interrupted."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args[:next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))]
    try:
        app(args=args, prog_name="slimlm")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except BaseException as exc:  # noqa: BLE001 - the one boundary where every error becomes one line
        if debug:
            traceback.print_exc()
        message = explain(exc)
        if message is not None:
            _say("error:", message)
            return 2
        _say("internal error:", f"{type(exc).__name__}: {_one_line(exc)} (a slimlm bug; rerun with --debug for the "
             "traceback and report it)")
        return 1
    return 0


def _say(label: str, message: str) -> None:
    """One line on stderr; the message is plain text (a shape like [32, 33] is not rich markup)."""
    err_console.print(Text.assemble((label, "bold red"), " ", message), highlight=False, soft_wrap=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def main() -> None:
    """The ``slimlm`` console script (also each process of ``accelerate launch -m slimlm``: any process group a
    command set up is torn down before exit)."""
    destroy_process_group_at_exit()
    sys.exit(run())


if __name__ == "__main__":
    main()
