"""The web app under load: `make app` on a checkpoint, and N visitors in headless Chromium.

    python benchmarks/bench_app.py CHECKPOINT --visitors 8 [--one-by-one] [--max-visitors N] [--pool 2]
                                   [--wait-after 120] [--leave close|unload] [--torch] [--hostile K] [--out FILE]

Starts `make app CHECKPOINT=... PORT=... MAX_VISITORS=... POOL=...` (the whole path a user takes:
the check, the export, Voilà), waits until its pool is warm and the server quiet, then sends the
visitors, all at once (or `--one-by-one`, each arriving once the one before has left). Each opens
the page in a browser context of its own, as the browser tests do (Debian's chromium, the same
flags), waits for the upload button, uploads one photo through the file chooser (the real photos
of ../shared/samples/cifar100 by default, one each, in turn), waits for its answer, and leaves:
`--leave close` (the default) closes the tab without running `beforeunload`, as a crashed tab,
a shut laptop or a lost network do, so that only the culler can end its kernel; `--leave unload`
runs it first, as a desktop browser closing a tab does (Voilà's page then asks the server to end
the kernel). A visitor past the limit gets the busy page (HTTP 503). `--hostile K`: visitor K
uploads, in one message, the two pictures that once took a page's kernel 1.25 GB and 4 s, and
0.96 GB and 2.3 s, to decode (tests/hostile_pictures.py: a 16-bit and a transparent PNG of
7000 x 7000, 95 and 190 kB), and waits for both answers.

Reported, as one JSON line: for each visitor the seconds from its arrival until the upload button
showed and until its answer (or the busy page, or the error); the app's memory (the server and its
kernels, summed: PSS, each shared page counted once, and RSS, as `ps` shows it) when idle, at its
peak, and `--wait-after` seconds after the last visitor left, with the kernels running at each
point. Sampled every second. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_app_browser import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402  (the browser tests' own setup)

BUTTON = re.compile(r"Pictures \(\d+\)")
TIMEOUT_S = 300  # a visitor who has no answer by then is reported as such


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """`make app`, its server process and its kernels, and their memory sampled every second."""

    def __init__(self, args, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = ["make", "--no-print-directory", "app", f"CHECKPOINT={args.checkpoint}", f"PORT={self.port}",
               f"MAX_VISITORS={args.max_visitors or ''}", f"POOL={args.pool}", f"APP_ARGS={'--torch' if args.torch else ''}"]
        self.log = log
        with open(log, "wb") as out:
            self.make = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._known: dict[int, psutil.Process] = {}

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while f"Open {self.url} in a browser" not in self.log.read_text(errors="replace") or not self._port_open():
            if self.make.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"make app did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def _port_open(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def server(self) -> psutil.Process:
        for p in psutil.Process(self.make.pid).children(recursive=True):
            if "cifarlib.serving.appserver" in " ".join(p.cmdline()):
                return p
        raise RuntimeError("no cifarlib.serving.appserver process under make app")

    def processes(self) -> tuple[psutil.Process, list[psutil.Process]]:
        """The server and its kernels, the same Process objects from call to call (for cpu_percent)."""
        server = self.server()
        kernels = [k for k in server.children(recursive=True) if "ipykernel" in " ".join(k.cmdline())
                   and k.status() != psutil.STATUS_ZOMBIE]
        self._known = {p.pid: self._known.get(p.pid, p) for p in [server, *kernels]}
        return self._known[server.pid], [self._known[k.pid] for k in kernels]

    def sample(self) -> dict:
        pss = rss = 0
        uss = {}
        server, kernels = self.processes()
        for p in [server, *kernels]:
            try:
                m = p.memory_full_info()
                pss, rss, uss[p.pid] = pss + m.pss, rss + m.rss, m.uss
            except psutil.NoSuchProcess:
                pass
        return {"t": time.monotonic(), "kernels": len(kernels), "pss_mb": round(pss / 1e6), "rss_mb": round(rss / 1e6),
                "server_uss_mb": round(uss.get(server.pid, 0) / 1e6),
                "kernel_uss_mb": max((round(uss[k.pid] / 1e6) for k in kernels if k.pid in uss), default=0),
                "cpu": sum(k.cpu_percent() for k in kernels if k.is_running()) + server.cpu_percent()}

    def wait_quiet(self, kernels: int, timeout_s: float = 300) -> dict:
        """Until the pool is warm (`kernels` running) and the app has used under 5% CPU for 5 s."""
        deadline, quiet = time.monotonic() + timeout_s, 0
        while quiet < 5 and time.monotonic() < deadline:
            s = self.sample()
            quiet = quiet + 1 if s["kernels"] == kernels and s["cpu"] < 5 else 0
            time.sleep(1)
        return self.sample()

    def start_sampling(self) -> None:
        def run():
            while not self._stop.is_set():
                try:
                    self.samples.append(self.sample())
                except (psutil.Error, RuntimeError):
                    pass
                self._stop.wait(1)
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.server().send_signal(signal.SIGTERM)  # Voilà ends its kernels on SIGTERM
            self.make.wait(timeout=60)
        except (RuntimeError, psutil.Error, subprocess.TimeoutExpired):
            os.killpg(self.make.pid, signal.SIGKILL)


async def visit(browser, url: str, photo: Path | list[Path], i: int, t_start: float, leave: str) -> dict:
    files = photo if isinstance(photo, list) else [photo]
    context = await browser.new_context(viewport={"width": 1000, "height": 720})
    page = await context.new_page()
    t0 = time.monotonic()
    rec = {"visitor": i + 1, "arrived_s": round(t0 - t_start, 1), "photo": ", ".join(f.name for f in files)}
    try:
        response = await page.goto(url, timeout=TIMEOUT_S * 1000)
        if response.status == 503:
            rec["busy_s"] = round(time.monotonic() - t0, 2)
            return rec
        button = page.get_by_role("button", name=BUTTON)
        await button.wait_for(timeout=max(1, TIMEOUT_S - (time.monotonic() - t0)) * 1000)
        rec["button_s"] = round(time.monotonic() - t0, 2)
        async with page.expect_file_chooser() as chooser:
            await button.click()
        await (await chooser.value).set_files([str(f) for f in files])
        answers = []
        for f in files:
            block = page.locator(".cifar-result, .cifar-message").filter(has_text=f"{f.name}:")
            await block.wait_for(timeout=max(1, TIMEOUT_S - (time.monotonic() - t0)) * 1000)
            answers.append((await block.inner_text()).splitlines()[0][:100])
        rec["answer_s"] = round(time.monotonic() - t0, 2)
        rec["answer"] = " | ".join(answers)
    except Exception as e:  # reported, not raised: the other visitors go on
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        rec["left_s"] = round(time.monotonic() - t_start, 1)
        if leave == "unload" and not page.is_closed():
            await page.close(run_before_unload=True)
            await asyncio.sleep(0.5)  # let the beacon go before the context goes
        await context.close()
    return rec


async def visitors(url: str, photos: list[Path], n: int, one_by_one: bool, leave: str,
                   hostile: tuple[int, list[Path]] | None = None) -> list[dict]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            t_start = time.monotonic()
            jobs = [(hostile[1] if hostile and i + 1 == hostile[0] else photos[i % len(photos)], i) for i in range(n)]
            if one_by_one:
                return [await visit(browser, url, photo, i, t_start, leave) for photo, i in jobs]
            return list(await asyncio.gather(*(visit(browser, url, photo, i, t_start, leave) for photo, i in jobs)))
        finally:
            await browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--visitors", type=int, default=1)
    ap.add_argument("--one-by-one", action="store_true", help="each visitor arrives once the one before has left")
    ap.add_argument("--max-visitors", type=int, default=0, help="MAX_VISITORS (default: make app's own)")
    ap.add_argument("--pool", type=int, default=2, help="POOL")
    ap.add_argument("--wait-after", type=int, default=120, help="seconds to wait after the last visitor left")
    ap.add_argument("--leave", choices=["close", "unload"], default="close")
    ap.add_argument("--photos", default=str(ROOT.parent / "shared" / "samples" / "cifar100"))
    ap.add_argument("--torch", action="store_true", help="pages on PyTorch (make app's --torch), for comparison")
    ap.add_argument("--hostile", type=int, default=0, help="this visitor (1-based) uploads the two crafted PNGs")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    log = ROOT / "runs" / f"bench_app-{os.getpid()}.log"
    log.parent.mkdir(exist_ok=True)
    load_before = os.getloadavg()
    app = App(args, log)
    try:
        app.wait_ready()
        idle = app.wait_quiet(args.pool)
        app.start_sampling()
        t0 = time.monotonic()
        hostile = None
        if args.hostile:
            import hostile_pictures
            made = hostile_pictures.write(log.parent / f"bench_app-{os.getpid()}-hostile")
            hostile = (args.hostile, [made["png16-7000.png"], made["rgba-7000.png"]])
        records = asyncio.run(visitors(app.url, photos, args.visitors, args.one_by_one, args.leave, hostile))
        t_left = time.monotonic()
        during = [s for s in app.samples if t0 <= s["t"] <= t_left]
        time.sleep(args.wait_after)
        after = app.sample()
    finally:
        app.stop()
    text = log.read_text(errors="replace")
    limit = re.search(r"Up to (\d+) visitors at once", text)
    peak = max(during, key=lambda s: s["pss_mb"]) if during else after
    answered = [r["answer_s"] for r in records if "answer_s" in r]
    result = {
        "checkpoint": args.checkpoint, "visitors": args.visitors, "arrival": "one by one" if args.one_by_one else "at once",
        "leave": args.leave, "engine": "torch" if args.torch else "onnxruntime", "pool": args.pool,
        "max_visitors": int(limit.group(1)) if limit else None,
        "answered": len(answered), "busy": sum("busy_s" in r for r in records), "failed": sum("error" in r for r in records),
        "slowest_answer_s": max(answered) if answered else None,
        "median_answer_s": sorted(answered)[len(answered) // 2] if answered else None,
        "idle": {k: idle[k] for k in ("kernels", "pss_mb", "rss_mb", "server_uss_mb", "kernel_uss_mb")},
        "peak": {"kernels": max(s["kernels"] for s in during) if during else None, "pss_mb": peak["pss_mb"],
                 "rss_mb": max(s["rss_mb"] for s in during) if during else None,
                 "kernel_uss_mb": max(s["kernel_uss_mb"] for s in during) if during else None},
        "after": {"seconds": args.wait_after, **{k: after[k] for k in ("kernels", "pss_mb", "rss_mb")}},
        "culled": len(re.findall(r"Culling '\w+' kernel", text)), "visitors_detail": records,
        "load_average_before": load_before, "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(result))
    if args.hostile:
        import shutil
        shutil.rmtree(log.parent / f"bench_app-{os.getpid()}-hostile", ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    log.unlink()


if __name__ == "__main__":
    main()
