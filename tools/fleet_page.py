"""Render the controller's fleet page (`GET /`) in a real headless browser and save the
screenshot: a local fleet (a controller with --http and the demo's four agents) serves the
reference model while requests run, and Chromium (Debian's package: apt-get install
chromium) loads the page twice, so that the live tokens/s line shows.

    python tools/fleet_page.py [--out docs/img/fleet-page.png]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.demo import agents_for  # noqa: E402
from controller.local import local_fleet  # noqa: E402
from proto import edgefleet_pb2 as pb  # noqa: E402
from proto import edgefleet_pb2_grpc as rpc  # noqa: E402
from proto.adapter import placement_pb  # noqa: E402
from solver.request import PlacementRequest  # noqa: E402

MODEL = ROOT / "models" / "reference" / "edgefleet-ref-f16.gguf"


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise SystemExit("no Chromium found; install Debian's package: apt-get install chromium")


def load(stub, stop: threading.Event) -> None:
    """Requests one after another, so that the page has tokens/s to show."""
    try:
        while not stop.is_set():
            for _ in stub.Generate(pb.GenerateRequest(prompt="The function returns", max_tokens=48)):
                pass
    except grpc.RpcError:       # the fleet is stopping
        return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "fleet-page.png")
    args = ap.parse_args()
    chrome = browser()
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="edgefleet-page-") as tmp, \
            local_fleet(Path(tmp), agents_for(MODEL), controller_extra=("--http", "127.0.0.1:0")) as (ctl, _):
        try:
            stub = rpc.ControllerStub(grpc.insecure_channel(ctl.address))
            for _ in stub.Deploy(placement_pb(PlacementRequest(str(MODEL)))):
                pass
            threading.Thread(target=load, args=(stub, stop), daemon=True).start()
            time.sleep(2)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            # the page polls every 2 s; 5 s of virtual time gives it two readings (tokens/s)
            subprocess.run([chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--window-size=1100,420", "--virtual-time-budget=5000", f"--screenshot={args.out}",
                            f"http://{ctl.info['http']}/"], check=True, capture_output=True, timeout=120)
            print(f"wrote {args.out}")
        finally:
            stop.set()


if __name__ == "__main__":
    main()
