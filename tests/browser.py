"""Headless Chromium for report tests: screenshot, DOM after scripts ran, and the net log."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(html_file: Path, work: Path) -> dict:
    """Open ``html_file``; return the DOM after load (``dom``), the screenshot path, the URLs
    the browser requested (from its net log) and stderr."""
    exe = chromium()
    url = html_file.resolve().as_uri()
    netlog = work / "netlog.json"
    common = [exe, *FLAGS, f"--user-data-dir={work / 'profile'}", f"--log-net-log={netlog}",
              "--virtual-time-budget=5000", "--window-size=1280,2400"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    shot = work / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    page_urls = page_requests(netlog) if netlog.is_file() else set()
    return {"dom": dom.stdout, "stderr": dom.stderr, "screenshot": shot, "urls": page_urls}


def page_requests(netlog: Path) -> set[str]:
    """URLs in a Chromium net log that the page requested (not the browser itself).

    Chromium's own traffic (update checks, sign-in) carries the initiator "not an origin",
    whatever its host; a page's requests carry its origin ("null" for a file:// page).
    """
    text = netlog.read_text(encoding="utf-8", errors="replace").rstrip().rstrip(",")
    if not text.endswith("}"):  # the browser may exit before closing the JSON
        text = text.rstrip("]").rstrip().rstrip(",") + "]}"
    log = json.loads(text)
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = set()
    for event in log.get("events", []):
        params = event.get("params") or {}
        if event.get("type") == start_job and params.get("initiator") != "not an origin":
            url = params.get("url", "")
            if url and not url.startswith(("data:", "file:")):
                urls.add(url)
    return urls
