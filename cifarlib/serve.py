"""Notebook 05 as a web page, served by Voilà: `make app`, or

    python -m cifarlib.serve [--checkpoint PATH] [--host 127.0.0.1] [--port 8866]

The checkpoint (by default the newest best.pt under checkpoints/) is checked first: with no
usable one, this exits with one message before any server starts. It is then injected into a copy
of the notebook as `papermill --prepare-only ... -p checkpoint PATH` would do, in runs/app/, and
Voilà serves that copy at http://HOST:PORT/: visitors see the notebook's text, outputs and
widgets, never its code, tracebacks or parameters, and cannot change them.

`FileUpload` sends a whole selection in one websocket message, which tornado cuts at 10 MiB by
default; the server raises that to `MAX_MESSAGE` (100 MB), so a selection larger than that
cannot reach the app.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from . import runtime
from .errors import UserError, cli_errors

NOTEBOOK = "notebooks/05_inference_widget.ipynb"
PREPARED = "runs/app/05_inference_widget.ipynb"
MAX_MESSAGE = 100_000_000  # bytes; tornado's default is 10 MiB
REMEDY = ("`make demo` writes a small one in about a minute (checkpoints/demo/best.pt), and a training run "
          "(make train, or notebook 03) a real one; or pass CHECKPOINT=path/to/best.pt.")


def pick_checkpoint(path: str | None = None, root: str = "checkpoints") -> Path:
    """The checkpoint to serve, checked by loading it as notebook 05 will; a clear error if unusable."""
    from .evaluate import newest_checkpoint
    from .predict import Predictor

    if not path:
        try:
            path = newest_checkpoint(root)
        except UserError:
            raise UserError(f"no best.pt under {runtime.resolve_path(root)}: nothing to serve. {REMEDY}") from None
    path = runtime.resolve_path(path)
    if not path.is_file():
        raise UserError(f"CHECKPOINT {path} does not exist. {REMEDY}")
    try:
        Predictor.from_checkpoint(path, device="cpu")
    except UserError as e:
        raise UserError(f"{e} {REMEDY}") from None
    return path


def prepare(checkpoint: Path, out: str = PREPARED) -> Path:
    """A copy of notebook 05 with `checkpoint` injected as its parameter, as papermill's --prepare-only."""
    import papermill as pm

    out_path = runtime.resolve_path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(runtime.resolve_path(NOTEBOOK)), str(out_path), parameters={"checkpoint": str(checkpoint)},
                        prepare_only=True, progress_bar=False, log_output=False)
    return out_path


def check_port_free(host: str, port: int) -> None:
    """Voilà would quietly move to another port; say so instead, since the URL was announced."""
    try:
        with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}): another server is using it? "
                        f"Stop it, or choose another port: make app PORT={port + 1}.") from None


def serve(notebook: Path, host: str, port: int) -> None:
    """Run Voilà on `notebook` until interrupted (Ctrl-C or SIGTERM)."""
    from voila.app import Voila

    # the kernels start in the notebook's folder: let them import the cifarlib that checked the checkpoint
    here = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))

    argv = [str(notebook), "--no-browser", f"--Voila.ip={host}", f"--Voila.port={port}", "--Voila.port_retries=0",
            "--VoilaConfiguration.show_tracebacks=False", "--VoilaConfiguration.strip_sources=True"]
    Voila.launch_instance(argv=argv, tornado_settings={"websocket_max_message_size": MAX_MESSAGE})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cifarlib.serve", description="Serve notebook 05 as a web page (Voilà).")
    ap.add_argument("--checkpoint", default="", help="a best.pt (default: the newest under checkpoints/)")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8866)
    ap.add_argument("--prepared", default=PREPARED, help="where to write the notebook with its parameter injected")
    args = ap.parse_args(argv)
    with cli_errors(ap.prog):
        checkpoint = pick_checkpoint(args.checkpoint)
        check_port_free(args.host, args.port)
        notebook = prepare(checkpoint, args.prepared)
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving notebook 05 with {checkpoint}\nOpen http://{url_host}:{args.port}/ in a browser "
          "(Ctrl-C stops the server).", flush=True)
    serve(notebook, args.host, args.port)


if __name__ == "__main__":
    main()
