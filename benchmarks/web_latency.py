"""Web app latencies, as a user meets them: the first page load after `animeddim serve` says
it is ready, and a warm Generate of 16 images at 10 DPM-Solver++(2M) steps.

    python benchmarks/web_latency.py [--starts 3] [--generates 5] [--model avatars-64]

Each start is a fresh `animeddim serve --port 0`; headless Chromium (/usr/bin/chromium) is
launched before the server so that its own start-up is not counted. The page counts as
loaded when its controls are filled from /api/info (body[data-ready]). Generate is timed
from the POST to the last byte of the result, and, in the same server process, compared
with nothing: the server's own timing of `pipelines.draw` is in the result ("seconds").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update"]  # fmt: skip


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "animeddim", "serve", "--model", model, "--port", "0"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    while True:
        line = lines.get(timeout=300)
        print("  server:", line.rstrip())
        if "ready at " in line:
            return proc, line.split("ready at ", 1)[1].split()[0].rstrip("/")


def generate(url: str) -> tuple[float, float]:
    body = {"model": "avatars-64", "n": 16, "steps": 10, "sampler": "dpmpp-2m", "seed": 0}
    req = urllib.request.Request(
        url + "/api/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        last = r.read().splitlines()[-1]
    wall = time.perf_counter() - t
    return wall, json.loads(last)["result"]["seconds"]


def main() -> None:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--generates", type=int, default=5)
    ap.add_argument("--model", default="avatars-64")
    a = ap.parse_args()
    loads, walls, draws = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
        for k in range(a.starts):
            proc, url = start_server(a.model)
            try:
                page = browser.new_page()
                t = time.perf_counter()
                page.goto(url + "/")
                page.wait_for_selector("body[data-ready='1']", timeout=60_000)
                loads.append(time.perf_counter() - t)
                page.close()
                if k == 0:
                    generate(url)  # the first request after warm-up, not counted
                    for _ in range(a.generates):
                        wall, drew = generate(url)
                        walls.append(wall)
                        draws.append(drew)
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=30)
        browser.close()
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in subprocess.run(
            ["lscpu"], capture_output=True, text=True).stdout.splitlines()
         if ln.startswith("Model name")), platform.processor())  # fmt: skip
    print(json.dumps({
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "first_page_load_s": [round(x, 3) for x in loads],
        "generate_16x10_dpmpp_wall_s": [round(x, 2) for x in walls],
        "generate_16x10_dpmpp_draw_s": draws,
        "median_wall_s": round(statistics.median(walls), 2) if walls else None,
        "median_page_load_s": round(statistics.median(loads), 3),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
