"""Where does a pipeline run's memory peak? Runs a config's last stage in this process and samples the resident set
size every 0.1 s together with the main thread's innermost frames, then prints the peak and a timeline (one line
per change of the innermost frame from this repository, or per jump of more than 60 MiB).

    PYTHONPATH=. python benchmarks/memory_timeline.py DIR/configs/memory-ppo-hf.yaml

(``alignment bench memory --out DIR`` writes such configs.) The last stage's folder is removed first, so it runs again
while earlier stages are reused.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def frames(thread_id: int, depth: int = 4) -> str:
    """The innermost ``depth`` frames, innermost first; this repository's own frames marked with *."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return ""
    stack = traceback.extract_stack(frame)[-depth:]
    names = []
    for f in reversed(stack):
        ours = str(REPO) in f.filename and "site-packages" not in f.filename
        names.append(f"{'*' if ours else ''}{Path(f.filename).name}:{f.lineno}:{f.name}")
    return " < ".join(names)


def main(config: Path) -> None:
    from alignment.pipeline import Pipeline, stage_dirname

    raw = yaml.safe_load(config.read_text())
    last = len(raw["stages"]) - 1
    shutil.rmtree(Path(raw["output_dir"]) / raw["name"] / stage_dirname(last, raw["stages"][last]["kind"]),
                  ignore_errors=True)
    main_thread, samples, done = threading.get_ident(), [], threading.Event()

    def poll():
        while not done.is_set():
            samples.append((time.time(), rss_mib(), frames(main_thread)))
            done.wait(0.1)

    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    try:
        Pipeline.from_yaml(config).run()
    finally:
        done.set()
        sampler.join()
    start = samples[0][0]
    peak = max(samples, key=lambda s: s[1])
    print(f"peak {peak[1]:,.0f} MiB at {peak[0] - start:.1f} s in {peak[2]}")
    shown = 0.0
    for t, rss, where in samples:
        if abs(rss - shown) > 60:
            print(f"{t - start:8.1f} s {rss:8,.0f} MiB  {where}")
            shown = rss


if __name__ == "__main__":
    main(Path(sys.argv[1]))
