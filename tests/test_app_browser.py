"""The web app (`make app`: notebook 05 served by Voilà) in a real browser: Debian's chromium,
driven by playwright.

One server per module, started as `make app` starts it (`python -m cifarlib.serve`), serving a
checkpoint the suite trains (exported once for all the servers of the session), and a second one
with a limit of one visitor, a pool of one and culling after 10 s, for the tests of what visitors
leave behind and of the busy page. Each test opens a fresh page, so a fresh kernel, and uploads
through the page's own file chooser as a user does. After each test the page must show no traceback or
error text, its console no error outside `ALLOWED_CONSOLE_ERRORS`, and the server no dead kernel.
Without /usr/bin/chromium the tests skip, except in CI (`CI` set), where they fail.
"""

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifarlib.data.synthetic import make_images
from cifarlib.serving.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SAMPLES = ROOT.parent / "shared" / "samples" / "cifar100"
SCREENSHOT = ROOT / "runs" / "app.png"  # ignored by git; `make app-screenshot` copies it to docs/app.png
CHROMIUM_FLAGS = ["--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
                  "--disable-gpu", "--disable-dev-shm-usage",
                  # no calls home: without a network they only fill the log
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--disable-quic"]
# (message pattern, resource-URL pattern), each with the reason it is harmless
ALLOWED_CONSOLE_ERRORS = [
    # Voilà's lab template links Font Awesome's CSS from a CDN, unreachable offline; its own
    # bundle carries the same icons, so nothing on the page is missing.
    (r"Failed to load resource: net::ERR_", r"^https://cdn\.jsdelivr\.net/npm/@fortawesome/"),
]
PAGE_FAULTS = re.compile(r"traceback|error|exception|kernel.{0,40}(died|dead|restart)", re.I)
SERVER_FAULTS = re.compile(r"Traceback|KernelRestarter|restarting kernel|died|Dead kernel", re.I)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


MISSING = [what for what, ok in (("/usr/bin/chromium (Debian/Ubuntu: apt-get install chromium)", os.path.exists(CHROMIUM)),
                                 ("playwright (pip install -r requirements-dev.txt)", importlib.util.find_spec("playwright")))
           if not ok]
NEEDS = "the browser tests need " + " and ".join(MISSING)
# a mark, so that a skip costs nothing (no server, no training); in CI the browser fixture fails instead
pytestmark = pytest.mark.skipif(bool(MISSING) and not in_ci(), reason=NEEDS)


@pytest.fixture(scope="module")
def browser():
    if MISSING:
        pytest.fail(NEEDS)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Server:
    url: str
    log: Path
    pid: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def stop(proc: subprocess.Popen, port: int) -> None:
    """Stop the server and the kernels it started, and wait until the port is free."""
    import psutil

    try:
        kernels = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kernels = []
    proc.send_signal(signal.SIGTERM)  # Voilà stops on SIGTERM
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and anything left in its group
        proc.wait(timeout=15)
    # kernels run in sessions of their own and exit within a second of their parent; make sure
    _, alive = psutil.wait_procs(kernels, timeout=10)
    for k in alive:
        k.kill()
    deadline = time.monotonic() + 15
    while port_open(port):
        assert time.monotonic() < deadline, f"port {port} still answers after the server stopped"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prepared(app_model, tmp_path_factory) -> Path:
    """Where the servers prepare the notebook: beside the model conftest's `app_model` exported
    (with serve's own stamp), so that they find it and start without exporting."""
    return tmp_path_factory.getbasetemp() / "app-model" / "05_inference_widget.ipynb"


@pytest.fixture(scope="module")
def server(trained_checkpoint, prepared, tmp_path_factory):
    """`python -m cifarlib.serve`, as `make app` runs it, on a free port; always stopped after the module."""
    with serving(trained_checkpoint, tmp_path_factory.mktemp("app"), prepared=prepared) as s:
        yield s


CULL_IDLE, CULL_INTERVAL = 10, 1  # the small server's, seconds


@pytest.fixture(scope="module")
def small_server(trained_checkpoint, prepared, tmp_path_factory):
    """The app with room for one visitor, one preheated page, and kernels culled 10-11 s after their page is gone."""
    with serving(trained_checkpoint, tmp_path_factory.mktemp("small"), "--max-visitors", "1", "--pool", "1",
                 "--cull-idle", str(CULL_IDLE), "--cull-interval", str(CULL_INTERVAL), prepared=prepared) as s:
        yield s


@contextmanager
def serving(checkpoint: Path, tmp: Path, *options: str, prepared: Path | None = None):
    port, log = free_port(), tmp / "server.log"
    cmd = [sys.executable, "-m", "cifarlib.serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--prepared", str(prepared or tmp / "05_inference_widget.ipynb"), *options]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while not (f"Open {url} in a browser" in log.read_text() and port_open(port)):
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no server at {url} after 120 s:\n{log.read_text()}"
            time.sleep(0.2)
        # the server answers (a file of Voilà's, which starts no kernel: a page would hold one of the visitors)
        assert urllib.request.urlopen(url + "voila/static/voila.js", timeout=60).status == 200
        yield Server(url, log, proc.pid)
    finally:
        stop(proc, port)


@dataclass
class AppPage:
    page: object
    problems: list = field(default_factory=list)

    def upload(self, *files: Path, timeout_s: float = 90):
        """Choose `files` in the page's file chooser; the result (or message) block of each file, in order."""
        button = self.page.get_by_role("button", name=re.compile(r"Pictures \(\d+\)"))
        with self.page.expect_file_chooser() as chooser:
            button.click()
        assert chooser.value.is_multiple() and chooser.value.element.get_attribute("accept") == ".jpg,.jpeg,.png,.webp,.gif,.bmp"
        chooser.value.set_files([str(f) for f in files])
        blocks = [self.page.locator(".cifar-result, .cifar-message").filter(has_text=f"{f.name}:") for f in files]
        for b in blocks:
            b.wait_for(timeout=timeout_s * 1000)
        assert self.page.locator(".cifar-result, .cifar-message").count() == len(files)
        return blocks

    def assert_healthy(self, server: Server, log_from: int) -> None:
        text = self.page.inner_text("body")
        for message in self.page.locator(".cifar-message").all_inner_texts():  # the app's own messages
            text = text.replace(message, "")
        assert not PAGE_FAULTS.search(text), f"error text on the page:\n{text}"
        assert "UploadApp(" not in text and "from cifarlib" not in text, "code shows on the page"
        assert not self.problems, "\n".join(self.problems)
        new_log = server.log_text()[log_from:]
        assert not SERVER_FAULTS.search(new_log), f"the server reports a fault:\n{new_log}"


def console_problem(msg) -> str | None:
    if msg.type != "error":
        return None
    url = msg.location.get("url", "")
    if any(re.search(m, msg.text) and re.search(u, url) for m, u in ALLOWED_CONSOLE_ERRORS):
        return None
    return f"console error: {msg.text} ({url})"


@pytest.fixture
def app(browser, server):
    """A fresh page (and kernel) of the app, ready for uploads; checked for faults afterwards."""
    with open_app(browser, server) as page:
        yield page


@contextmanager
def open_app(browser, server: Server):
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    page = context.new_page()
    app, log_from = AppPage(page), len(server.log_text())
    page.on("console", lambda m: (p := console_problem(m)) and app.problems.append(p))
    page.on("pageerror", lambda e: app.problems.append(f"uncaught page error: {e}"))
    page.on("crash", lambda _: app.problems.append("the page crashed"))
    try:
        page.goto(server.url, timeout=120_000)
        try:
            page.get_by_role("button", name=re.compile(r"Pictures \(\d+\)")).wait_for(timeout=120_000)
        except Exception as e:
            pytest.fail(f"the app did not appear ({e}).\nPage:\n{page.inner_text('body')}\n"
                        f"Server log:\n{server.log_text()[log_from:]}\n" + "\n".join(app.problems))
        yield app
        app.assert_healthy(server, log_from)
    finally:
        page.goto("about:blank")  # unloading the page asks Voilà to shut its kernel down
        context.close()


@pytest.fixture(scope="module")
def predictor(trained_checkpoint):
    return Predictor.from_checkpoint(trained_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A real CIFAR-100 photo (from ../shared when present) and a larger, non-square picture made here."""
    tmp = tmp_path_factory.mktemp("pictures")
    made = Image.fromarray(make_images(torch.tensor([53]), seed=3)[0].permute(1, 2, 0).numpy())
    made.resize((240, 180), Image.BICUBIC).save(tmp / "made.png")
    real = sorted(SAMPLES.glob("*.png"))
    if not real:  # without ../shared: a second made picture stands in for the photo
        made.rotate(90).resize((320, 240), Image.BICUBIC).save(tmp / "photo.png")
    return {"photo": real[0] if real else tmp / "photo.png", "made": tmp / "made.png", "dir": tmp}


def chart_rows(block) -> list[tuple[str, float]]:
    rows = [r.locator("td").all_inner_texts() for r in block.locator("tr").all()]
    return [(name.strip(), float(pct.strip().rstrip("%"))) for name, _, pct in rows]


def assert_predicted(block, path: Path, predictor: Predictor) -> None:
    """The page shows what cifarlib.serving.predict says of the same file: its top class first, then the
    other classes with their probabilities (to the 0.1% shown), and three pictures: the file, the
    image the model sees, and where it looked."""
    expected = predictor.predict(path, top_k=len(predictor.classes)).top
    probs = dict(expected)
    rows = chart_rows(block)
    assert len(rows) == 5 and rows[0][0] == expected[0][0], (rows, expected[:5])
    assert all(abs(pct - 100 * probs[name]) <= 0.051 for name, pct in rows), (rows, expected[:5])
    assert [pct for _, pct in rows] == sorted((pct for _, pct in rows), reverse=True)
    caption = block.inner_text()
    assert f"{path.name}: {expected[0][0]} ({expected[0][1]:.1%})" in caption
    assert ("superclass" in caption) == bool(predictor.superclasses)  # CIFAR-100's, none for CIFAR-10
    assert "the 32 px image the model sees" in caption and f"where it looked for {expected[0][0]}" in caption
    sizes = block.locator("img").evaluate_all("imgs => imgs.map(i => [i.complete, i.naturalWidth])")
    assert len(sizes) == 3 and all(done and width > 0 for done, width in sizes), sizes
    looked = block.locator("img.cifar-looked")  # the Grad-CAM view, beside the image the model sees
    assert looked.count() == 1 and looked.evaluate("i => i.naturalWidth") == 128


def test_a_photo_is_predicted_as_cifarlib_predict_does(app, pictures, predictor):
    (block,) = app.upload(pictures["photo"])
    assert_predicted(block, pictures["photo"], predictor)


def test_a_text_file_named_jpg_gets_a_message_and_the_next_upload_works(app, pictures, predictor):
    fake = pictures["dir"] / "notes.jpg"
    fake.write_text("shopping list: apples, pears\n")
    (block,) = app.upload(fake)
    assert block.inner_text().strip() == "notes.jpg: not a usable image (not a picture in one of JPEG, PNG, WEBP, GIF, BMP)."
    (block,) = app.upload(pictures["made"])
    assert_predicted(block, pictures["made"], predictor)


def test_two_files_at_once_both_get_predictions(app, pictures, predictor):
    blocks = app.upload(pictures["photo"], pictures["made"])
    for block, path in zip(blocks, (pictures["photo"], pictures["made"])):
        assert_predicted(block, path, predictor)
    screenshot(app.page)


def screenshot(page, width: int = 1000) -> None:
    """runs/app.png, the whole of the page. Voilà's page scrolls inside a panel, which
    full_page does not see: make the window fit it."""
    page.set_viewport_size({"width": width, "height": 720})
    height = page.evaluate("Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollHeight))")
    page.set_viewport_size({"width": width, "height": min(height, 2000)})
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))


REAL_CHECKPOINT = os.environ.get("APP_SCREENSHOT_CHECKPOINT", "")


def validation_photos(checkpoint: Path, folder: Path) -> list[Path]:
    """Pictures from the checkpoint's own validation split, as PNG files of the pixels it was
    stored at: two right answers of two classes and one mistake, each of a confidence typical
    of its kind (nearest the median of the right answers', or of the mistakes'), each file named
    by its true class."""
    from cifarlib.evaluation.evaluate import evaluate_checkpoint

    ev = evaluate_checkpoint(checkpoint, split="val", device="cpu")
    conf, pred = ev.probs.max(1)
    right = pred == ev.labels
    names, picks = ev.checkpoint["classes"], []
    for i in (conf - conf[right].median()).abs().argsort().tolist():
        if right[i] and len(picks) < 2 and all(ev.labels[j] != ev.labels[i] for j in picks):
            picks.append(i)
    picks.append(next(i for i in (conf - conf[~right].median()).abs().argsort().tolist() if not right[i]))
    print(f"{checkpoint}: validation top-1 {ev.metrics['top1']:.2%} on {ev.metrics['samples']} pictures")
    files = []
    for k, i in enumerate(picks):
        files.append(folder / f"{names[ev.labels[i]]}-{k + 1}.png")
        Image.fromarray(ev.split.images[i].permute(1, 2, 0).numpy()).save(files[-1])
    return files


@pytest.mark.skipif(not REAL_CHECKPOINT, reason="set APP_SCREENSHOT_CHECKPOINT to a checkpoint (make app-screenshot)")
def test_screenshot_of_a_model_trained_on_real_photos(browser, tmp_path):
    """docs/app.png (`make app-screenshot CHECKPOINT=...`): the app serving a checkpoint trained on
    real photos, shown photos from its own validation split, some it gets right and one it gets wrong."""
    checkpoint = Path(REAL_CHECKPOINT).resolve()
    files = validation_photos(checkpoint, tmp_path)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    with serving(checkpoint, tmp_path) as server, open_app(browser, server) as app:
        for block, path in zip(app.upload(*files), files):
            assert_predicted(block, path, predictor)
        screenshot(app.page, width=820)  # docs/app.png: at most 150 kB (make app-screenshot)


def test_a_21_mb_file_gets_a_message_and_the_picture_beside_it_a_prediction(app, pictures, predictor):
    big = pictures["dir"] / "big.png"  # a PNG that would decode: only its size is refused
    picture = pictures["made"].read_bytes()
    big.write_bytes(picture + bytes(21_000_000 - len(picture)))
    blocks = app.upload(big, pictures["made"])  # one websocket message above tornado's default 10 MiB
    assert "big.png: the file is 21.0 MB, above the limit of 20 MB" in blocks[0].inner_text()
    assert_predicted(blocks[1], pictures["made"], predictor)


def kernels(server: Server) -> int:
    """The server's running kernels (its child processes that are ipykernels)."""
    import psutil

    alive = []
    for child in psutil.Process(server.pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "ipykernel" in " ".join(child.cmdline()):
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return len(alive)


def wait_for_kernels(server: Server, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (k := kernels(server)) != n:
        assert time.monotonic() < deadline, f"{k} kernels, not {n}, after {timeout_s} s:\n{server.log_text()[-3000:]}"
        time.sleep(0.2)


def test_a_page_closed_without_a_word_has_its_kernel_ended_by_the_culler(browser, small_server):
    """A page closed as a tab crashes or a laptop is shut: no beforeunload, so no beacon asks the
    server to end the kernel. The culler ends it once it has been idle without a page."""
    wait_for_kernels(small_server, 1)  # the pool
    context = browser.new_context()
    page = context.new_page()
    page.goto(small_server.url, timeout=60_000)
    page.get_by_role("button", name=re.compile(r"Pictures \(\d+\)")).wait_for(timeout=60_000)
    wait_for_kernels(small_server, 2)  # the page's, and the pool's new one
    page.close()  # run_before_unload=False: what the culler must handle
    context.close()
    wait_for_kernels(small_server, 1, timeout_s=CULL_IDLE + CULL_INTERVAL + 30)
    assert re.search(r"Culling '\w+' kernel .* with 0 connections", small_server.log_text())


def test_a_visitor_past_the_limit_gets_the_busy_page_and_the_app_once_there_is_room(browser, small_server):
    """With a limit of one visitor; the first leaves as a closed tab does (beforeunload runs: the
    page's beacon asks the server to end its kernel, which Voilà alone refuses without a token)."""
    wait_for_kernels(small_server, 1)
    context = browser.new_context()
    late = context.new_page()
    log_from = len(small_server.log_text())
    with open_app(browser, small_server):  # the one visitor the server holds
        wait_for_kernels(small_server, 2)  # its kernel, and the pool's new one
        response = late.goto(small_server.url, timeout=10_000)  # at once: it must not wait for a kernel
        text = late.inner_text("body")
        assert response.status == 503 and response.headers["retry-after"] == "30", (response.status, text)
        assert "The app is busy" in text and "Please try again shortly" in text and "tries again by itself" in text
        assert kernels(small_server) == 2  # no kernel was started for the busy page
    deadline = time.monotonic() + 60
    while "its slot is free" not in small_server.log_text()[log_from:]:  # its beacon, accepted
        assert time.monotonic() < deadline, small_server.log_text()[log_from:]
        time.sleep(0.1)
    # at once: the slot is free from the beacon's acceptance, not from the kernel's exit (a reload
    # at the limit used to get the busy page, and another visitor could take the slot meanwhile)
    status = late.reload(timeout=60_000).status
    assert status == 200, f"busy right after the visitor left:\n{small_server.log_text()[-3000:]}"
    late.get_by_role("button", name=re.compile(r"Pictures \(\d+\)")).wait_for(timeout=60_000)
    log = small_server.log_text()[log_from:]
    assert "Culling" not in log and "403 POST /voila/api/shutdown" not in log, log
    late.goto("about:blank")
    context.close()


def test_a_page_whose_connection_drops_keeps_its_kernel_when_it_comes_back_in_time(browser, small_server, pictures):
    """A phone's screen locks, a Wi-Fi hands over: the websocket of a page idle for longer than the
    cull time drops, and the page comes back 3 s later (its reconnections refused until then). Its
    kernel is there and answers: the grace period counts from the drop. (jupyter_server counted it
    from the kernel's last activity, so such a page lost its kernel within a second.)"""
    wait_for_kernels(small_server, 1)
    context = browser.new_context()
    page = context.new_page()
    live, away = [], {"now": False}

    def route(ws):  # the page's kernel connection, through playwright: to drop it, and to refuse it for a while
        if away["now"]:
            ws.close()
        else:
            live.append(ws.connect_to_server())
    page.route_web_socket(re.compile(r"/api/kernels/[^/]+/channels"), route)
    app = AppPage(page)
    page.goto(small_server.url, timeout=60_000)
    page.get_by_role("button", name=re.compile(r"Pictures \(\d+\)")).wait_for(timeout=60_000)
    wait_for_kernels(small_server, 2)
    log_from = len(small_server.log_text())
    time.sleep(CULL_IDLE + 2 * CULL_INTERVAL)  # idle, connected, past the cull time: the case defined
    away["now"] = True
    for ws in live:
        ws.close()  # the connection drops, on both sides
    time.sleep(3)
    away["now"] = False  # the page's next try to reconnect gets through
    result, = app.upload(pictures["made"])
    assert "cifar-result" in result.get_attribute("class"), result.inner_text()
    assert "Culling" not in small_server.log_text()[log_from:] and kernels(small_server) == 2
    page.goto("about:blank")
    context.close()
