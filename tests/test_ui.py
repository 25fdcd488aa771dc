"""The MLflow and Prefect UIs of `selfalign server` in a real browser: Debian's headless Chromium,
driven through the Chrome DevTools Protocol (no driver download, which Playwright and Selenium's
manager would need). The MLflow store holds a run written through the tracking seam the way the
run flow writes it; Prefect holds a flow run with the pipeline's flow and sub-flow names. Checks
that the parent run and its nested round runs are listed with their metrics, and the flow run with
its round sub-flows; screenshots go to $SELFALIGN_TEST_ARTIFACTS (default: the test's tmp dir).
Skipped where `chromium` is not installed (`apt-get install chromium`)."""
import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless Chromium page over the DevTools protocol: navigate, read text, click, screenshot."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for line in self.proc.stderr:
            found = re.search(r"DevTools listening on ws://([^/]+)/", line)
            if found:
                break
        else:
            raise RuntimeError(f"chromium exited {self.proc.wait()} before listening")
        with urllib.request.urlopen(f"http://{found.group(1)}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=2**26)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:  # events arrive in between; skip them
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_text(self, needles: list[str], timeout: float = 90, at_least: dict[str, int] | None = None) -> str:
        """The page's text once every needle is on it, and each of `at_least` that many times (parts of
        a page, such as the flow names of Prefect's sub-flow rows, are filled in by later requests)."""
        deadline = time.time() + timeout
        wanted = {n: 1 for n in needles} | (at_least or {})
        while True:
            text = self.js("document.body ? document.body.innerText : ''") or ""
            missing = [f"{n} (x{k}, found {text.count(n)})" for n, k in wanted.items() if text.count(n) < k]
            if not missing:
                return text
            assert time.time() < deadline, f"not on the page after {timeout}s: {missing}\n{text[:2000]}"
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self.ws.close()
        os.killpg(self.proc.pid, signal.SIGTERM)  # the browser and its helper processes
        self.proc.wait(30)


STAND_IN_FLOWS = """
from prefect import flow

@flow(name="dice-round", flow_run_name="round-{r}")
def round_flow(r: int) -> int:
    return r

@flow(name="selfalign-run", flow_run_name="demo")
def run_flow() -> list:
    return [round_flow(1), round_flow(2)]

run_flow()
"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_mlflow_and_prefect_uis_show_the_run_and_its_rounds(tmp_path):
    from test_compare import fake_run
    from test_server import Server, client_env, free_port

    shots = Path(os.environ.get("SELFALIGN_TEST_ARTIFACTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    pport, mport = free_port(), free_port()
    srv = Server(tmp_path / "home", pport, mport)
    browser = None
    try:
        srv.wait_for("stops both servers", timeout=300)
        parent = fake_run(f"http://127.0.0.1:{mport}", "demo", rounds=2, reported=2)
        parent.close()
        flows = subprocess.run([sys.executable, "-c", STAND_IN_FLOWS], env=client_env(tmp_path, pport),
                               capture_output=True, text=True, timeout=300)
        assert flows.returncode == 0, flows.stderr[-3000:]

        browser = Browser(tmp_path / "profile")
        mlflow = f"http://127.0.0.1:{mport}/#/experiments/{parent.experiment_id}"
        browser.goto(f"{mlflow}/runs")
        browser.wait_text(["demo", "3 matching runs"])
        # the parent row's expander shows the nested round runs
        assert browser.js("""(() => {
            const row = [...document.querySelectorAll('.ag-row')].find(r => r.innerText.includes('demo'));
            const button = row && row.querySelector('button');
            if (button) button.click();
            return Boolean(button); })()""")
        browser.wait_text(["round_1", "round_2"])
        browser.screenshot(shots / "mlflow_runs.png")
        browser.goto(f"{mlflow}/runs/{parent.run_id}")
        text = browser.wait_text(["eval/preferred_rate", "eval/label_precision", "alpha_star", "pairs/kept"])
        assert re.search(r"eval/accuracy\s+0\.7\b", text) and re.search(r"pairs/kept\s+302\b", text)
        browser.screenshot(shots / "mlflow_parent_run.png")

        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{pport}/api/flow_runs/filter", method="POST",
                data=json.dumps({"flow_runs": {"name": {"any_": ["demo"]}}}).encode(),
                headers={"Content-Type": "application/json"}), timeout=30) as r:
            [run] = json.load(r)
        browser.goto(f"http://127.0.0.1:{pport}/runs/flow-run/{run['id']}")
        browser.wait_text(["demo", "selfalign-run", "Completed", "Subflow Runs"])
        assert browser.js("""(() => {
            const tab = [...document.querySelectorAll('li,button,[role=tab]')].find(e => e.innerText.trim() === 'Subflow Runs');
            if (tab) tab.click();
            return Boolean(tab); })()""")
        browser.wait_text(["2 Flow runs", "round-1", "round-2"], at_least={"dice-round": 2})
        browser.screenshot(shots / "prefect_flow_run.png")
        for name in ("mlflow_runs", "mlflow_parent_run", "prefect_flow_run"):
            assert (shots / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        print(f"screenshots: {shots}")
    finally:
        if browser is not None:
            browser.close()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(60)
        except subprocess.TimeoutExpired:
            srv.kill()
