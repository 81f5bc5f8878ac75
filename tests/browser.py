"""Headless Chromium for report tests: screenshot, DOM after scripts ran, and the net log."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


#: Chromium's own background traffic (time sync, updates, accounts), not the page's
BROWSER_OWN = r"https?://([a-z0-9-]+\.)*(google\.com|googleapis\.com|gvt1\.com|gstatic\.com)/"


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
    # the log is written incrementally and may lack its closing brackets: scan for URLs
    text = netlog.read_text(errors="replace") if netlog.is_file() else ""
    urls = set(re.findall(r'"url":"([^"]+)"', text))
    page_urls = {u for u in urls if not re.match(BROWSER_OWN, u)}
    return {"dom": dom.stdout, "stderr": dom.stderr, "screenshot": shot, "urls": page_urls}
