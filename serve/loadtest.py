"""Load benchmark for a running server: concurrent clients inspecting and chatting, each checking its answers.

    python -m anomaly_assistant.serve.loadtest --url http://127.0.0.1:7860 --clients 20 --requests 200

Each client alternates `POST /api/inspect` (an image under a name only it uses) and `POST /api/chat` (a
question carrying its own marker) and checks that the Finding names its image and that the chat history holds
exactly its own questions, so a leak between sessions counts. Prints one JSON line: requests, errors, leaks,
p50/p95 latency (s) and throughput (requests/s). A benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _client(url: str, index: int, count: int, image: bytes, reference_set: str | None,
            auth: tuple[str, str] | None, out: dict, lock: threading.Lock) -> None:
    import httpx

    latencies, errors, leaks = [], [], 0
    with httpx.Client(base_url=url, timeout=600, auth=auth) as http:
        session, asked = None, []
        for n in range(count):
            start = time.perf_counter()
            try:
                if session is None or n % 2 == 0:
                    name = f"client{index:02d}_{n:03d}.png"
                    data = {"reference_set": reference_set} if reference_set else {}
                    r = http.post("/api/inspect", files={"image": (name, image, "image/png")}, data=data)
                    r.raise_for_status()
                    body = r.json()
                    leaks += body["finding"]["image"] != name
                    session, asked = body["session_id"], []
                else:
                    question = f"client {index} question {n}: what caused it?"
                    r = http.post("/api/chat", json={"session_id": session, "message": question})
                    r.raise_for_status()
                    asked.append(question)
                    users = [t["content"] for t in r.json()["history"] if t["role"] == "user"][1:]
                    leaks += users != asked
            except Exception as exc:  # counted, the run goes on
                errors.append(f"{type(exc).__name__}: {exc}")
            latencies.append(time.perf_counter() - start)
    with lock:
        out["latencies"] += latencies
        out["errors"] += errors
        out["leaks"] += leaks


def run(url: str, clients: int = 20, requests: int = 200, image: str | None = None,
        reference_set: str | None = "demo samples", auth: tuple[str, str] | None = None) -> dict:
    """Run the benchmark; returns the summary printed by the command line."""
    from anomaly_assistant.resources import sample_images

    data = Path(image or sample_images()[1]).read_bytes()
    out: dict = {"latencies": [], "errors": [], "leaks": 0}
    lock = threading.Lock()
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for i, count in enumerate(per_client):
            pool.submit(_client, url.rstrip("/"), i, count, data, reference_set, auth, out, lock)
    wall = time.perf_counter() - start
    lat = sorted(out["latencies"])
    return {"requests": len(lat), "clients": clients, "errors": len(out["errors"]), "leaks": out["leaks"],
            "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
            "throughput_rps": round(len(lat) / wall, 2), "wall_s": round(wall, 1),
            "first_errors": out["errors"][:3]}


def main(argv: list[str] | None = None) -> int:
    """Command line: prints the summary as JSON; exit 1 when any request failed or leaked."""
    parser = argparse.ArgumentParser(prog="python -m anomaly_assistant.serve.loadtest", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--image", help="image to send (default: a bundled sample)")
    parser.add_argument("--reference-set", default="demo samples", help="named set ('' for none)")
    parser.add_argument("--auth", metavar="USER:PASS")
    args = parser.parse_args(argv)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    summary = run(args.url, args.clients, args.requests, args.image, args.reference_set or None, auth)
    print(json.dumps(summary))
    return int(bool(summary["errors"] or summary["leaks"]))


if __name__ == "__main__":
    sys.exit(main())
