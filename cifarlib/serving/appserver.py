"""Voilà, set up to hold a classroom: what `make app` runs once `cifarlib.serving.serve` has prepared the page.

    python -m cifarlib.appserver NOTEBOOK [--host H] [--port P] [--max-visitors N] [--pool N]
                                 [--cull-idle S] [--cull-interval S]

Every page view runs a kernel of its own. Three settings keep a server with many visitors alive:

- **Kernels end when their visitors leave.** Voilà's page asks the server to end its kernel when
  it is closed (a beacon on `beforeunload`), but Voilà 0.5's server refuses that request (403,
  "'_xsrf' argument missing from POST": a beacon cannot carry the XSRF token;
  voila-dashboards/voila#1458, open), so without `BeaconShutdown` no kernel ended with its page.
  `BeaconShutdown` accepts the beacon when it comes from a page of this server (its Origin or
  Referer is this host), the cross-site check the token stands for. A tab that crashes, a laptop
  that is shut, a phone that drops its network or a page closed while it loads never sends the
  beacon at all. Jupyter's culler
  (`MappingKernelManager.cull_idle_timeout`, `cull_interval`, `cull_connected`) ends those: a
  kernel with no page connected to it, idle for `cull_idle` seconds, checked every
  `cull_interval`. A kernel whose page is still connected is never culled (`cull_connected=False`),
  however long it stays idle: an open page whose kernel had ended would stop answering without
  saying why, and its visitor's next upload would be lost. A page whose browser vanished without
  closing its connection (a network that drops) stops answering the server's websocket pings and
  is disconnected 90 to 120 s after its last answer (jupyter_server pings every 30 s and gives up
  after 90), then culled. `cull_idle` (60 s) is far longer than a page takes to connect once
  its kernel has run the notebook (the whole page shows in 3 s, and in 25-29 s for 8 pages
  loading at once on 2 cores with their browsers, benchmarks/README.md), and short enough that
  what visitors leave is given back within two minutes (70 s after the last one left, at most);
  a kernel taken from the pool counts as active from the moment it is taken (it may have waited
  in the pool for longer than `cull_idle`).
- **Quick pages.** Voilà's preheated kernels (`preheat_kernel`, `pool_size`): `pool` kernels
  have run the notebook before anyone asks, so the first visitors get a finished page at once;
  each one taken is replaced. The pool is never culled.
- **A limit on visitors.** At most `max_visitors` pages hold kernels at once (the pool's come
  on top); one more gets a plain "busy" page (HTTP 503, Retry-After) that says to try again
  shortly and tries again by itself, instead of a kernel the machine may not have memory for.
  Voilà has no such limit (voila-dashboards/voila#617, open since 2020, suggests a 503), so it
  is ours: `PageKernels` counts the kernels that pages hold, `PageHandler` refuses a page past
  the limit before any kernel starts. The count is exact at every step of the event loop: a kernel
  a page starts is counted from the call that starts it, a pool kernel from the moment a page
  takes it (even when it is still starting), and both until the kernel has stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import html
import ipaddress
import re
import os
import sys
from pathlib import Path

import tornado.web
from jupyter_server._tz import utcnow
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from traitlets import Integer
from voila.app import Voila
from voila.shutdown_kernel_handler import VoilaShutdownKernelHandler
from voila.tornado.handler import TornadoVoilaHandler

from .serve import CULL_IDLE, CULL_INTERVAL, MAX_MESSAGE, PER_CLIENT, POOL, RESERVE_MB, default_max_visitors

RETRY_S = 30  # the busy page tries again after this many seconds
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("client", default=None)  # the page being served's


class VisitorLimit(Exception):
    """A page asked for a kernel past `PageKernels.max_visitors`."""


class PageKernels(AsyncMappingKernelManager):
    """The kernel manager, counting the kernels that pages hold (Voilà's pool wraps this class)."""

    max_visitors = Integer(0, config=True, help="the most pages holding kernels at once (0: no limit)")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._pages: set[str] = set()  # kernels pages hold, from their start until they are removed
        self._taken: dict[asyncio.Task, str] = {}  # pool kernels pages took while still starting -> their client
        self._clients: dict[str, str] = {}  # kernel -> the remote address of the page that holds it

    def visitors(self) -> int:
        for task in [t for t in self._taken if t.done()]:
            self._hold(task, self._taken.pop(task))
        return len(self._pages) + len(self._taken)

    def full(self) -> bool:
        return bool(self.max_visitors) and self.visitors() >= self.max_visitors

    def take(self, pool_task: asyncio.Task, client: str) -> None:
        """A page of `client` is about to take this pool entry (Voilà's pool holds tasks that start
        kernels)."""
        if pool_task.done():
            self._hold(pool_task, client)
        else:
            self._taken[pool_task] = client
            pool_task.add_done_callback(lambda t: self.visitors())

    def _hold(self, task: asyncio.Task, client: str) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        kernel_id = task.result()["kernel_id"]
        if kernel_id in self:
            self._pages.add(kernel_id)
            self._clients[kernel_id] = client
            self.get_kernel(kernel_id).last_activity = utcnow()  # its idle time starts now, not in the pool

    async def start_kernel(self, *, kernel_id: str | None = None, **kwargs):
        if (kwargs.get("env") or {}).get("VOILA_PREHEAT") == "True":  # a kernel for the pool
            return await super().start_kernel(kernel_id=kernel_id, **kwargs)
        if self.full():
            raise VisitorLimit()
        kernel_id = kernel_id or self.new_kernel_id()
        self._pages.add(kernel_id)
        if CLIENT.get():
            self._clients[kernel_id] = CLIENT.get()
        try:
            return await super().start_kernel(kernel_id=kernel_id, **kwargs)
        except BaseException:
            self._pages.discard(kernel_id)
            raise

    def remove_kernel(self, kernel_id: str):
        self._pages.discard(kernel_id)
        self._clients.pop(kernel_id, None)
        return super().remove_kernel(kernel_id)

    def leaving(self, kernel_id: str) -> None:
        """A page said it is closing (its beacon was accepted): its slot is free now, not when its
        kernel's process has exited, so that the same visitor reloading gets a page at once."""
        if kernel_id in self._pages:
            self.log.info("A page left (its beacon came): kernel %s ends, and its slot is free", kernel_id)
        self._pages.discard(kernel_id)
        self._clients.pop(kernel_id, None)

    def notify_disconnect(self, kernel_id: str) -> None:
        """The last connection of a page is gone (closed, or a network that dropped): the culler's
        idle time counts from now, a grace period in which the page may reconnect. jupyter_server
        counts it from the kernel's last activity, so a page idle for longer than `cull_idle` lost
        its kernel within `cull_interval` of any drop (a phone's screen locking, a Wi-Fi handover)."""
        super().notify_disconnect(kernel_id)
        if self._kernel_connections.get(kernel_id) == 0 and kernel_id in self:
            self.get_kernel(kernel_id).last_activity = utcnow()

    def held_by(self, client: str) -> int:
        """Pages that `client` (a remote address) holds."""
        return sum(1 for c in [*self._clients.values(), *self._taken.values()] if c == client)


BUSY_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{retry}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Busy: please try again shortly</title></head>
<body style="font-family: sans-serif; max-width: 36em; margin: 4em auto; line-height: 1.5">
<h1>The app is busy</h1>
<p>It is serving {visitors} visitors, as many as this server can hold at once. Please try again
shortly: this page tries again by itself every {retry} seconds.</p>
</body></html>
"""


PER_CLIENT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Too many pages from one address</title></head>
<body style="font-family: sans-serif; max-width: 36em; margin: 4em auto; line-height: 1.5">
<h1>Too many pages from your address</h1>
<p>Your address already holds {held} pages of this app, as many as one address may (so that one
visitor cannot keep everyone else out). Close one of them, then reload this page.</p>
</body></html>
"""


def loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class PageHandler(TornadoVoilaHandler):
    """Voilà's page, or the busy page when the visitors are at the limit, or a refusal when the
    visitor's address already holds `per_client` pages (loopback exempt: every visitor of a local
    app comes from it)."""

    per_client = 0  # set by the server from --per-client

    @tornado.web.authenticated
    async def get(self, path=None):
        km = self.kernel_manager
        if path or not isinstance(km, PageKernels):  # a file next to the notebook: no kernel
            return await super().get(path)
        client = self.request.remote_ip or ""
        if self.per_client and not loopback(client) and km.held_by(client) >= self.per_client:
            return self.too_many(km.held_by(client))
        if km.full():
            return self.busy(km)
        CLIENT.set(client)  # for start_kernel, in this request's context only
        pool = getattr(km, "_pools", {}).get(self.notebook_path) or []
        if pool and self.should_use_rendered_notebook(km.notebook_data.get(self.notebook_path, {}), len(pool),
                                                      self.get_argument("template", None),
                                                      self.get_argument("theme", None), self.request.arguments):
            km.take(pool[0], client)  # the entry Voilà is about to pop, in the same step of the event loop
        try:
            await super().get(path)
        except VisitorLimit:  # raised before the page wrote anything
            self.busy(km)

    def busy(self, km: PageKernels) -> None:
        self.log.warning("Busy: %d visitors, the limit; a busy page sent", km.visitors())
        self.refuse(503, BUSY_PAGE.format(retry=RETRY_S, visitors=html.escape(str(km.max_visitors))))

    def too_many(self, held: int) -> None:
        self.log.warning("%s holds %d pages, the limit per address; refused", self.request.remote_ip, held)
        self.refuse(429, PER_CLIENT_PAGE.format(held=held))

    def refuse(self, status: int, page: str) -> None:
        self.clear()
        self.set_status(status)
        self.set_header("Retry-After", str(RETRY_S))
        self.set_header("Cache-Control", "no-store")
        self.finish(page)


class BeaconShutdown(VoilaShutdownKernelHandler):
    """Voilà's "end my kernel" request from a closing page, which is a beacon (`navigator.sendBeacon`)
    and so carries no XSRF token: accepted when the browser says it comes from a page of this
    server (an Origin header, or else a Referer, naming this host), as jupyter_server's own
    checks decide; anything else still needs the token."""

    def check_xsrf_cookie(self) -> None:
        if self.request.headers.get("Origin") and self.check_origin() or self.check_referer():
            return None
        return super().check_xsrf_cookie()

    async def post(self, kernel_id: str):
        km = self.kernel_manager
        if isinstance(km, PageKernels):
            km.leaving(kernel_id)  # the slot is free from now: a reload finds room
        return await super().post(kernel_id)


def host_checker(allowed: set[str]):
    """A `check_host` for every handler of the server: the request's `Host` (its name, without the
    port) must be one the server answers to. Voilà turns jupyter_server's own check off
    (`allow_remote_access=True`), so a page elsewhere could reach a local app through DNS
    rebinding (a name that resolves to 127.0.0.1); and jupyter_server's check would refuse every
    address but loopback, which a classroom's server (HOST=0.0.0.0) must answer to."""
    def check_host(handler) -> bool:
        host = re.sub(r":\d+$", "", handler.request.host or "").strip("[]").lower()
        if host in allowed:
            return True
        handler.log.warning("Refused a request for Host %r: this app answers to %s (ALLOWED_HOSTS adds names)",
                            handler.request.host, ", ".join(sorted(allowed)))
        return False
    return check_host


def allowed_hosts(host: str, extra: list[str]) -> set[str]:
    """The names the app answers to: loopback's, the address it listens on (but 0.0.0.0 and ::,
    which no browser asks for), and `extra`."""
    names = {"127.0.0.1", "localhost", "::1"}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host.lower())
    return names | {h.strip().lower() for h in extra if h.strip()}


class AppServer(Voila):
    """Voilà with `PageHandler` serving the notebook and `BeaconShutdown` ending a closed page's kernel."""

    def init_handlers(self):
        swap = {TornadoVoilaHandler: PageHandler, VoilaShutdownKernelHandler: BeaconShutdown}
        return [(route[0], swap.get(route[1], route[1]), *route[2:]) for route in super().init_handlers()]


def voila_arguments(notebook: str, host: str, port: int, max_visitors: int, pool: int = POOL,
                    cull_idle: int = CULL_IDLE, cull_interval: int = CULL_INTERVAL) -> list[str]:
    """Voilà's command line for these settings."""
    return [notebook, "--no-browser", f"--Voila.ip={host}", f"--Voila.port={port}", "--Voila.port_retries=0",
            "--VoilaConfiguration.show_tracebacks=False", "--VoilaConfiguration.strip_sources=True",
            f"--VoilaConfiguration.multi_kernel_manager_class={PageKernels.__module__}.PageKernels",
            f"--PageKernels.max_visitors={max_visitors}",
            f"--VoilaConfiguration.preheat_kernel={pool > 0}", f"--VoilaConfiguration.default_pool_size={pool}",
            f"--MappingKernelManager.cull_idle_timeout={cull_idle}",
            f"--MappingKernelManager.cull_interval={cull_interval}",
            "--MappingKernelManager.cull_connected=False"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cifarlib.serving.appserver", description=__doc__.splitlines()[0])
    ap.add_argument("notebook", help="the notebook to serve, its parameters already injected (cifarlib.serving.serve)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8866)
    ap.add_argument("--max-visitors", type=int, default=0, help="the most pages at once (0: what the memory holds)")
    ap.add_argument("--page-mb", type=int, default=0, help="a page's peak memory, for the limit from the memory")
    ap.add_argument("--pool", type=int, default=POOL, help="preheated kernels (0: none)")
    ap.add_argument("--cull-idle", type=int, default=CULL_IDLE, help="seconds a kernel without a page may stay idle")
    ap.add_argument("--cull-interval", type=int, default=CULL_INTERVAL, help="seconds between the culler's checks")
    ap.add_argument("--allowed-hosts", default="", help="more names (Host headers) to answer to, separated by commas")
    ap.add_argument("--per-client", type=int, default=PER_CLIENT, help="pages one remote address may hold (0: no limit)")
    args = ap.parse_args(argv)
    # the kernels start in the notebook's folder: let them import the cifarlib that prepared it
    here = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    limit = visitor_limit(args.max_visitors, args.page_mb, args.pool)
    allowed = allowed_hosts(args.host, args.allowed_hosts.split(","))
    JupyterHandler.check_host = host_checker(allowed)  # every handler's check, this process being the server
    PageHandler.per_client = args.per_client
    url_host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Answers to {', '.join(sorted(allowed))} (ALLOWED_HOSTS= adds names); at most "
          f"{args.per_client or 'any number of'} pages per address, loopback apart (PER_CLIENT=); a page's kernel ends "
          f"when its page is closed, or {args.cull_idle}-{args.cull_idle + args.cull_interval} s after its connection "
          "is gone (a page that reconnects in that time keeps it).", flush=True)
    print(f"Open http://{url_host}:{args.port}/ in a browser (Ctrl-C stops the server).", file=sys.stdout, flush=True)
    AppServer.launch_instance(argv=voila_arguments(args.notebook, args.host, args.port, limit, args.pool,
                                                   args.cull_idle, args.cull_interval),
                              tornado_settings={"websocket_max_message_size": MAX_MESSAGE})


def visitor_limit(asked: int, page_mb: int, pool: int) -> int:
    """The most pages at once: `asked`, or what the memory available to this process (the server,
    which holds neither torch nor the model) holds at `page_mb` a page, the pool's counted first;
    said, with a warning where the memory holds fewer pages than the pool."""
    limit, available = default_max_visitors(page_mb, pool)
    why = (f"a page may take {page_mb} MB at its peak; {available / 1000:.1f} GB is available, "
           f"{RESERVE_MB / 1000:.0f} GB kept free")
    if asked:
        limit, why = asked, f"as asked; {why}"
    print(f"Up to {limit} visitors at once ({why}), and {pool} preheated pages.", flush=True)
    if (available - RESERVE_MB) // max(page_mb, 1) < pool:
        print(f"warning: the memory available holds fewer pages ({max(0, (available - RESERVE_MB) // max(page_mb, 1))}) "
              f"than the pool of {pool} preheated ones: lower POOL=, or free some memory.", flush=True)
    return limit


if __name__ == "__main__":
    from cifarlib.serving import appserver  # this module by its name, as Voilà imports PageKernels, not as __main__

    appserver.main()
