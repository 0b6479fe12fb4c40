"""The ``mrivq`` command line: a thin typer layer over the library.

Every command parses its options, calls one library function and prints the result with rich.
User errors (:class:`mrivq.utils.errors.MrivqError`) become one line on stderr and exit code 2; the
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import sys
import warnings

import typer
from rich.markup import escape

from mrivq import __version__
from mrivq.cli.common import err, out
from mrivq.cli.datasets import datasets_app, fetch, presets
from mrivq.cli.evaluate import eval_
from mrivq.cli.inference import decode, encode, export, reconstruct, score, synth
from mrivq.cli.preprocess import preprocess
from mrivq.cli.train import train
from mrivq.utils.errors import MrivqError, find_in_chain, user_message


class _OneLineUsage(typer.core.TyperGroup):
    """Command-line usage errors (an unknown command, a missing or extra argument, a bad option value) as
    mrivq errors: one line naming the problem and the ``--help`` to read, exit code 2, like every other
    bad input (typer would print a usage block and a boxed message)."""

    @staticmethod
    def _one_line(e: Exception) -> Exception:
        if type(e).__name__ == "NoArgsIsHelpError" or not hasattr(e, "format_message") \
                or not hasattr(e, "ctx") or getattr(e, "exit_code", None) != 2:
            return e
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "mrivq"
        return MrivqError(f"{e.format_message()} (see `{where} --help`)")

    def parse_args(self, ctx, args):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().parse_args(ctx, args)
        except Exception as e:
            raise self._one_line(e) from None

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except Exception as e:
            raise self._one_line(e) from None


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_OneLineUsage,
                  help="Vector-quantized autoencoders and PixelCNN priors for MRI, on MONAI.")

def _version(value: bool) -> None:
    if value:
        out.print(f"mrivq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """mrivq: compress MRI into discrete codes, synthesize volumes, score how typical a scan is."""



app.add_typer(datasets_app, name="datasets")
app.command()(fetch)
app.command()(train)
app.command("eval")(eval_)
for _command in (preprocess, encode, decode, reconstruct, synth, score, export, presets):
    app.command()(_command)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings as one line each ("warning: ..."), like errors; --debug keeps Python's format."""
    err.print(f"[yellow]warning:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)


def _from_ctrl_c(e: BaseException) -> bool:
    """Whether an exception's chain holds a KeyboardInterrupt (typer's ``Exit(130)`` from Ctrl-C)."""
    return find_in_chain(e, KeyboardInterrupt) is not None


def main() -> None:
    """Console entry point: one-line errors with exit code 2 unless --debug."""
    from mrivq.utils import distributed as ddp

    debug = "--debug" in sys.argv
    who = ddp.label()  # "rank 1: " under torchrun: which process said it
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        app()
    except (KeyboardInterrupt, SystemExit) as e:  # typer turns Ctrl-C into exit code 130, silently
        if isinstance(e, SystemExit) and not _from_ctrl_c(e):
            raise  # a normal exit, or training's own "interrupted at step N" (exit 130, already said)
        err.print(f"[red]interrupted:[/] {escape(who)}what was finished is kept; run the same command again to "
                  "continue", highlight=False, soft_wrap=True)
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        msg = user_message(e)
        if msg is not None:
            err.print(f"[red]error:[/] {escape(who + ' '.join(msg.split()))}", highlight=False, soft_wrap=True)
            sys.exit(getattr(e, "exit_code", 2))
        if not ddp.peer_failed(e):
            raise
        err.print(f"[red]error:[/] {escape(who)}stopped because another process of this torchrun job failed "
                  f"(its own message is above or in torchrun's summary)", highlight=False, soft_wrap=True)
        sys.exit(2)
