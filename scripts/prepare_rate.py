"""MB/s and peak memory of `python -m megajax.data.prepare` on a large corpus of shipped text.

python scripts/prepare_rate.py --mb 512 --tokenizers gpt2 bert

Builds one text file of at least --mb MB under --tmp from the shipped corpora (tiny Shakespeare,
the WikiText-103 slice, the LAMBADA passages) repeated, prepares it with each tokenizer in a
process of its own, and prints that process's MB/s, peak RSS (VmHWM, read from /proc) and the
machine's load average before and after: the cores may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_CHILD = (
    "import sys; from megajax.data import prepare; code = prepare.main(sys.argv[1:]); "
    "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); "
    "sys.exit(code)"
)


def corpus(directory: Path, megabytes: int) -> Path:
    """A text file of at least `megabytes` MB: the shipped text, repeated."""
    path = directory / f"shipped-{megabytes}mb.txt"
    if path.is_file() and path.stat().st_size >= megabytes * 1e6:
        return path
    lambada = (ROOT / "data/lambada/lambada_sample.jsonl").read_text(encoding="utf-8")
    unit = "\n\n".join(
        [
            (ROOT / "data/shakespeare/input.txt").read_text(encoding="utf-8"),
            (ROOT / "data/wikitext103/wiki.valid.head429.tokens").read_text(encoding="utf-8"),
            "\n\n".join(json.loads(line)["text"] for line in lambada.splitlines()),
        ]
    ).encode()
    with open(path, "wb") as f:
        for _ in range(int(megabytes * 1e6 // len(unit)) + 1):
            f.write(unit)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=512, help="corpus size in MB")
    parser.add_argument("--tokenizers", nargs="+", default=["gpt2", "bert"])
    parser.add_argument("--tmp", default="/tmp/megajax-prepare-rate")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and datasets")
    args = parser.parse_args()
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    text = corpus(tmp, args.mb)
    size = text.stat().st_size / 1e6
    cpu = next(
        (line.split(":")[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?"
    )
    print(f"{size:.0f} MB of text, {os.cpu_count()} cores of {cpu}")
    for name in args.tokenizers:
        out = tmp / f"prepared-{name}"
        shutil.rmtree(out, ignore_errors=True)
        load = os.getloadavg()[0]
        began = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-c", _CHILD, str(text), "--out", str(out), "--tokenizer", name],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        seconds = time.perf_counter() - began
        if run.returncode:
            sys.exit(f"{name}: {run.stderr.strip().splitlines()[-1]}")
        peak = int(run.stdout.split()[-1]) / 2**20
        files = sum(
            len(s["files"])
            for s in json.loads((out / "megajax.json").read_text())["splits"].values()
        )
        print(
            f"{name}: {size / seconds:.2f} MB/s ({seconds:.0f}s for the whole process), peak RSS "
            f"{peak:.2f} GB, {files} shards; load average {load:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after"
        )
        if not args.keep:
            shutil.rmtree(out)
    if not args.keep:
        text.unlink()


if __name__ == "__main__":
    main()
