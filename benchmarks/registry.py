"""Registry: publishing a version and a replica's first load, on S3 against a directory.

    python benchmarks/registry.py [--rounds 5]

Takes the live version of the local registry (`TUNELOOP_REGISTRY__URL`, default var/registry; `tuneloop
bootstrap` makes one) and, each round, interleaved, publishes its files as a new version into a fresh
directory registry and into a fresh bucket on a real S3-compatible server on loopback (versitygw,
`deploy/s3/local_server.py`), then loads it as a new replica would (a fresh Registry, an empty cache:
download and check every sha256 on S3, check every sha256 on the directory) and once more (cached).
The directory is the anchor: what a registry needs today, a disk every host shares. Writes
benchmarks/results/registry.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.spread import spread  # noqa: E402
from cli.processes import local_s3  # noqa: E402
from tuneloop.registry import MANIFEST, Manifest, Registry  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def publish_copy(manifest: Manifest, directory: Path, target: Registry) -> None:
    with target.staging() as staged:
        shutil.copytree(directory, staged, dirs_exist_ok=True)
        (staged / MANIFEST).unlink()
        target.publish(staged, base_model=manifest.base_model, labels=manifest.labels, export=manifest.export,
                       gate=manifest.gate)


def measure(url: str, cache: Path, manifest: Manifest, version_dir: Path) -> dict[str, float]:
    publisher = Registry(url, cache / "publisher")
    publish_s = timed(lambda: publish_copy(manifest, version_dir, publisher))
    replica = Registry(url, cache / "replica")
    first_s = timed(lambda: replica.resolve(servable=True))
    cached_s = timed(lambda: replica.resolve(servable=True))
    return {"publish_s": publish_s, "first_load_s": first_s, "cached_load_s": cached_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    local = Registry(os.environ.get("TUNELOOP_REGISTRY__URL", "var/registry"))
    if local.live_version() is None:
        sys.exit(f"no live version in {local.location}: run `tuneloop bootstrap` first")
    manifest, version_dir = local.resolve()
    size = sum(entry.bytes for entry in manifest.files.values())
    runs: dict[str, list[dict[str, float]]] = {"directory": [], "s3": []}
    with tempfile.TemporaryDirectory() as work, local_s3().running_s3() as server:
        os.environ.update(server.env())
        for round_ in range(args.rounds):
            for backend in (["directory", "s3"] if round_ % 2 == 0 else ["s3", "directory"]):
                cache = Path(work) / f"{backend}-{round_}"
                url = str(cache / "registry") if backend == "directory" else (
                    server.create_bucket(f"bench-{uuid.uuid4().hex[:12]}") + "/registry")
                runs[backend].append(measure(url, cache, manifest, version_dir))
                m = runs[backend][-1]
                print(f"round {round_ + 1}/{args.rounds} {backend:9s} publish {m['publish_s']:.2f} s, first load "
                      f"{m['first_load_s']:.2f} s, cached load {m['cached_load_s']:.2f} s", flush=True)
    result: dict[str, object] = {
        "command": "python benchmarks/registry.py " + " ".join(sys.argv[1:]),
        "host": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "version_files": len(manifest.files), "version_bytes": size, "rounds": args.rounds,
    }
    for backend, measured in runs.items():
        result[backend] = {key: spread([m[key] for m in measured]) for key in measured[0]}
    result["s3_over_directory"] = {
        key: spread([s[key] / d[key] for s, d in zip(runs["s3"], runs["directory"], strict=True)])
        for key in ("publish_s", "first_load_s", "cached_load_s")
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "registry.json").write_text(json.dumps(result, indent=2) + "\n")
    for key in ("publish_s", "first_load_s", "cached_load_s"):
        r = result["s3_over_directory"][key]
        print(f"{key}: directory {result['directory'][key]['median']:.2f} s, S3 {result['s3'][key]['median']:.2f} s: "
              f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})")
    print(f"wrote {RESULTS / 'registry.json'} ({len(manifest.files)} files, {size / 1e6:.1f} MB a version)")


if __name__ == "__main__":
    main()
