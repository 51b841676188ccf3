"""Notebook 05 as a web page, served by Voilà: `make app`, or

    python -m cifarlib.serve [--checkpoint PATH] [--host 127.0.0.1] [--port 8866] [--max-visitors N]
                             [--pool 2] [--cull-idle 60] [--cull-interval 10]

The checkpoint (by default the newest best.pt under checkpoints/) is checked first: with no
usable one, this exits with one message before any server starts. It is then exported to ONNX
with its activation maps (`cifarlib.export --cams`, once per checkpoint, kept beside the prepared
notebook), so that each page runs it on onnxruntime without importing torch: a quarter of
the memory per page (`cifarlib.serving.onnxpredict` says why). A checkpoint that cannot be exported so (a
head that is not average pooling and one linear layer, or onnx not installed) is served on
PyTorch instead, with a notice. The checkpoint and the model are injected into a copy of the
notebook as `papermill --prepare-only ... -p checkpoint PATH -p onnx_model MODEL` would do, in
runs/app/. Voilà then serves that copy at http://HOST:PORT/ (`cifarlib.serving.appserver`, which this
process becomes, so that the memory the checks took is given back): visitors see the notebook's
text, outputs and widgets, never its code, tracebacks or parameters, and cannot change them.

How many visitors at once: `--max-visitors`, by default what the memory available to the server
holds (read by the server itself, once this process has become it and given back torch and the
model), 1 GB kept free, at a page's peak (`page_mb`: its kernel's measured cost and the model's
weights, the peak of the worst picture it accepts, and an upload message held twice, by the server
and by the kernel), the pool's kernels counted first. The pool, the culling of kernels whose pages
are gone, the busy page past the limit, the names the server answers to and the pages one address
may hold are `cifarlib.serving.appserver`'s.

`FileUpload` sends a whole selection in one websocket message, which tornado cuts at 10 MiB by
default; the server raises that to `MAX_MESSAGE` (64 MB), so a selection larger than that
cannot reach the app, and the app reads at most `app.MAX_FILES` pictures of one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from .. import __version__
from ..core import runtime
from ..core.errors import UserError, cli_errors

NOTEBOOK = "notebooks/05_inference_widget.ipynb"
PREPARED = "runs/app/05_inference_widget.ipynb"
# A page's memory beyond the model's weights, in MB: what one more page adds, the unique memory
# (USS) of a page's kernel after an upload while other pages run (the libraries' code is shared
# between them), with EfficientNet-Lite0 at most 112 MB on onnxruntime and 496 on PyTorch, 14 of
# them its weights (benchmarks/bench_app.py; benchmarks/README.md, "The web app under load").
PAGE_MB = {"onnx": 130, "torch": 490}
PICTURE_MB = 150  # the most an accepted picture costs at its peak (cifarlib.data.pictures: the limits measured)
RESERVE_MB = 1024  # kept free for the server, the system and whatever else runs there
PER_CLIENT = 4  # pages one remote address may hold (loopback apart): one visitor cannot keep out the rest
POOL = 2  # preheated kernels: each holds a page's memory while it waits
# A kernel whose page is gone (closed without telling the server, or no longer answering its pings)
# ends after CULL_IDLE s idle, checked every CULL_INTERVAL s; one whose page is connected never
# does. Why these values: cifarlib.serving.appserver's docstring.
CULL_IDLE, CULL_INTERVAL = 60, 10
MAX_MESSAGE = 64_000_000  # bytes; tornado's default is 10 MiB
REMEDY = ("`make demo` writes a small one in about a minute (checkpoints/demo/best.pt), and a training run "
          "(make train, or notebook 03) a real one; or pass CHECKPOINT=path/to/best.pt.")


def pick_checkpoint(path: str | None = None, root: str = "checkpoints") -> Path:
    """The checkpoint to serve, checked by loading it as notebook 05 will; a clear error if unusable."""
    from ..evaluation.evaluate import newest_checkpoint
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


def page_model(checkpoint: Path, folder: Path) -> Path | None:
    """The checkpoint exported with its activation maps (`folder`/model.onnx), exported again only
    when the checkpoint changed; None, with a notice, when it cannot be (the pages then run PyTorch)."""
    from .export import export

    out, stamp = folder / "model.onnx", folder / "model.onnx.source"
    st = checkpoint.stat()
    source = {"checkpoint": str(checkpoint), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "cifarlib": __version__}
    try:
        if json.loads(stamp.read_text()) == source and out.is_file() and out.with_name(out.name + ".json").is_file():
            return out
    except (OSError, ValueError):
        pass
    print(f"Exporting {checkpoint} to ONNX for the pages (once per checkpoint)...", flush=True)
    try:
        export(checkpoint, out, cams=True)
    except Exception as e:  # the app still serves: on PyTorch, as before there was an export
        why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e} (a bug: please report it)"
        print(f"Serving on PyTorch instead, about {PAGE_MB['torch']} MB a page rather than {PAGE_MB['onnx']}: {why}",
              flush=True)
        return None
    stamp.write_text(json.dumps(source))
    return out


def page_mb(checkpoint: Path, onnx_model: Path | None) -> int:
    """A page's peak memory: the measured cost of its kernel, the model's weights (the file's
    size), the worst accepted picture's peak, and one upload message held by the server and by the
    kernel."""
    weights = round((onnx_model or checkpoint).stat().st_size / 1e6)
    return PAGE_MB["onnx" if onnx_model else "torch"] + weights + PICTURE_MB + 2 * MAX_MESSAGE // 1_000_000


def default_max_visitors(page: int, pool: int) -> tuple[int, int]:
    """(visitors the available memory holds, that memory in MB), RESERVE_MB and the pool counted first."""
    import psutil

    available = psutil.virtual_memory().available // 1_000_000
    return max(1, (available - RESERVE_MB) // page - pool), available


def prepare(checkpoint: Path, out: str = PREPARED, onnx_model: Path | None = None) -> Path:
    """A copy of notebook 05 with `checkpoint` (and `onnx_model`, when there is one) injected as its
    parameters, as papermill's --prepare-only."""
    import papermill as pm

    out_path = runtime.resolve_path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    parameters = {"checkpoint": str(checkpoint), **({"onnx_model": str(onnx_model)} if onnx_model else {})}
    pm.execute_notebook(str(runtime.resolve_path(NOTEBOOK)), str(out_path), parameters=parameters,
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cifarlib.serve", description="Serve notebook 05 as a web page (Voilà).")
    ap.add_argument("--checkpoint", default="", help="a best.pt (default: the newest under checkpoints/)")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8866)
    ap.add_argument("--prepared", default=PREPARED, help="where to write the notebook with its parameters injected "
                                                         "(the exported model goes beside it)")
    ap.add_argument("--max-visitors", type=int, default=0,
                    help="the most pages at once; past it, a busy page (default: what the available memory holds)")
    ap.add_argument("--pool", type=int, default=POOL, help="preheated kernels, ready before a visitor comes")
    ap.add_argument("--cull-idle", type=int, default=CULL_IDLE,
                    help="seconds a kernel whose page is gone may stay idle before it is ended")
    ap.add_argument("--cull-interval", type=int, default=CULL_INTERVAL, help="seconds between checks for those")
    ap.add_argument("--torch", action="store_true", help="run the pages on PyTorch, not on the exported model")
    ap.add_argument("--allowed-hosts", default="", help="names besides 127.0.0.1, localhost and --host that the app "
                    "answers to (Host headers), separated by commas: needed with --host 0.0.0.0")
    ap.add_argument("--per-client", type=int, default=PER_CLIENT,
                    help="pages one remote address may hold at once (loopback apart; 0: no limit)")
    args = ap.parse_args(argv)
    with cli_errors(ap.prog):
        if min(args.max_visitors, args.pool, args.per_client) < 0 or args.cull_idle < 1 or args.cull_interval < 1:
            raise UserError("--max-visitors, --pool and --per-client must be 0 or more, --cull-idle and --cull-interval "
                            "1 or more.")
        checkpoint = pick_checkpoint(args.checkpoint)
        check_port_free(args.host, args.port)
        folder = runtime.resolve_path(args.prepared).parent
        folder.mkdir(parents=True, exist_ok=True)
        onnx_model = None if args.torch else page_model(checkpoint, folder)
        notebook = prepare(checkpoint, args.prepared, onnx_model)
    print(f"Serving notebook 05 with {checkpoint}, on {'onnxruntime' if onnx_model else 'PyTorch'}", flush=True)
    # this process becomes the server: the memory that checking and exporting took is given back,
    # and the server reads the memory available for its visitors then
    here = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "cifarlib.serving.appserver", str(notebook), "--host", args.host,
                              "--port", str(args.port), "--max-visitors", str(args.max_visitors),
                              "--page-mb", str(page_mb(checkpoint, onnx_model)), "--pool", str(args.pool),
                              "--cull-idle", str(args.cull_idle), "--cull-interval", str(args.cull_interval),
                              "--allowed-hosts", args.allowed_hosts, "--per-client", str(args.per_client)])


if __name__ == "__main__":
    main()
