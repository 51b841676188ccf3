"""Run a notebook headless, as papermill does, with a user's mistake shown as its message alone.

    python -m cifarlib.notebook notebooks/03_train.ipynb runs/train.ipynb -p epochs 100

The arguments are papermill's: the notebook, where the executed copy goes, and `-p NAME VALUE`
(values read as papermill reads them: True/False/None, then int, then float, else text) or
`-r NAME VALUE` (text as given). `make train` and `make demo` run the notebooks with it.

Why not papermill's own command: when a cell raises a `UserError` (no data and no network, a bad
setting), papermill prints some 40 lines of its own traceback and the message comes last. Here the
notebook runs through papermill's Python API, and a `UserError` in a cell is printed as
`python -m cifarlib.notebook: error: <its message>`, with exit status 2, as the other command-line
tools do; the executed copy, with its outputs up to the failing cell, is written all the same. Any
other error in a cell is a bug, and is shown with its traceback (exit status 1). A parameter the
notebook does not have is refused before anything runs (papermill would only warn and go on).

`--stream` prints what the cells print (their stdout and stderr) as it comes, and nothing else of
theirs: for notebook 03, the device plan, the budget's plan and one line per epoch, as the command
line prints them, without papermill's bar over cells or the tables and figures, which the
executed copy keeps (`make train` and `make demo` use it). The kernel is told when this command
began (`cifarlib.core.clock`), so that a budget counts the whole command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import clock, runtime
from .errors import UserError, cli_errors

PROG = "python -m cifarlib.notebook"


def parse_value(text: str):
    """A `-p` value as papermill reads it: True/False/None, then int, then float, else text.

    Our own, not `cifarlib.training.config.parse_value` (the same rule), because importing the config
    imports torch, torchvision and timm: seconds before the kernel even starts; nor papermill's,
    which is private (`papermill.cli._resolve_type`)."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run(notebook: str | Path, output: str | Path, parameters: dict | None = None, kernel: str = "python3",
        progress_bar: bool = True, log_output: bool = False, stream: bool = False, **papermill_options) -> Path:
    """Execute `notebook` with `parameters` into `output` (paths by the project's path rule);
    a `UserError` raised in a cell is raised here as a `UserError` with the same message.
    `stream`: the cells' printed lines to this process's stdout and stderr as they come. Other
    options go to `papermill.execute_notebook` (`km`, say: a kernel that is already running)."""
    try:
        import papermill as pm
    except ImportError:
        raise UserError("running a notebook needs papermill: pip install -r requirements.txt") from None
    src, out = runtime.resolve_path(notebook), runtime.resolve_path(output)
    if not src.is_file():
        raise UserError(f"the notebook {src} does not exist.")
    parameters = dict(parameters or {})
    known = pm.inspect_notebook(str(src))
    unknown = [name for name in parameters if name not in known]
    if unknown:
        raise UserError(f"{src.name} has no parameter {', '.join(unknown)}; its parameters are "
                        f"{', '.join(known) or 'none'} (see papermill --help-notebook {src}).")
    out.parent.mkdir(parents=True, exist_ok=True)
    if stream:
        papermill_options.update(stdout_file=sys.stdout, stderr_file=sys.stderr)
    try:
        pm.execute_notebook(str(src), str(out), parameters=parameters, kernel_name=kernel,
                            progress_bar=progress_bar, log_output=log_output, **papermill_options)
    except pm.PapermillExecutionError as e:
        if e.ename == "UserError":
            raise UserError(e.evalue) from None
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description="Run a notebook headless with parameters, as papermill "
                                 "does; a user's mistake (a UserError in a cell) is printed as its message alone.")
    ap.add_argument("notebook", help="the notebook to run, e.g. notebooks/03_train.ipynb")
    ap.add_argument("output", help="where the executed copy goes, e.g. runs/train.ipynb")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a parameter, its value read as papermill reads it (True, 3, 0.5, None, text)")
    ap.add_argument("-r", "--raw-parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a parameter whose value is text as given")
    ap.add_argument("-k", "--kernel", default="python3", help="the Jupyter kernel (default: python3)")
    ap.add_argument("--no-progress-bar", action="store_true", help="no progress bar over the cells")
    ap.add_argument("--log-output", action="store_true", help="also print the cells' outputs as they come")
    ap.add_argument("--stream", action="store_true", help="print what the cells print (stdout, stderr) as it comes, "
                    "not their tables and figures: notebook 03's training lines")
    args = ap.parse_args(argv)
    clock.mark_command_start()
    parameters = {name: parse_value(value) for name, value in args.parameter}
    parameters.update(dict(args.raw_parameter))
    if args.log_output:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    with cli_errors(PROG):
        if args.stream:
            print(f"{PROG}: {args.notebook} -> {args.output}; what its cells print follows", file=sys.stderr, flush=True)
        out = run(args.notebook, args.output, parameters, args.kernel, not args.no_progress_bar, args.log_output,
                  args.stream)
        print(f"executed notebook: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
