"""Shared helpers for the benchmarks: machine facts, RESULTS.md, real manifests and features, timing.

Work files (manifests, cached features, the generated R100 graph) go to
``$FEATLAB_BENCH_DIR`` (default ``/tmp/featlab-bench``); nothing is written
inside the repository except ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
UTK_DIR = ROOT.parent / "shared" / "data" / "utkface-dev"
SAMPLE_DIR = ROOT / "featlab" / "data" / "utkface-sample"

#: ``--tiny``: a smoke run of a few seconds (tests/test_bench.py runs every script so), on the 600-face sample
#: shipped in featlab (what a fresh clone has), work files in ``<workdir>/tiny``, figures not checked, nothing
#: recorded. Set by :func:`tiny`.
TINY = False


def tiny(args, **sizes) -> bool:
    """With ``--tiny``: put ``sizes`` (option name -> tiny value) into ``args``, record nothing, and take the
    faces from the shipped sample. Returns whether the run is tiny."""
    global TINY
    if not getattr(args, "tiny", False):
        return False
    TINY = True
    args.no_record = True
    for k, v in sizes.items():
        setattr(args, k, v)
    print(f"[bench] tiny mode (figures not meaningful, nothing recorded): {sizes}", flush=True)
    return True


def workdir() -> Path:
    d = Path(os.environ.get("FEATLAB_BENCH_DIR", "/tmp/featlab-bench")) / ("tiny" if TINY else "")
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------- machine and versions
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return float("nan")


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def versions(extra: tuple[str, ...] = ()) -> dict:
    from importlib import metadata

    names = ("featlab", "numpy", "onnxruntime", "onnxruntime-gpu", "tables", "dlib-bin", "dlib", "pillow",
             "opencv-python", *extra)
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "featlab"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+uncommitted featlab/ changes" if dirty else "")
    except OSError:
        return "?"


def machine() -> dict:
    from featlab.features.extract import cpu_count

    return {"cpu": cpu_model(), "cores": cpu_count(), "logical_cpus": os.cpu_count(), "ram_gib": round(ram_gib(), 1),
            "gpu": gpu_name(), "os": platform.platform()}


def load() -> str:
    try:
        a, b, c = os.getloadavg()
        return f"{a:.1f}/{b:.1f}/{c:.1f}"
    except OSError:
        return "?"


def record(title: str, argv: list[str], table: str, notes: str = "", extra_versions: tuple[str, ...] = (),
           load_before: str = "", enabled: bool = True) -> None:
    """Append one run (command, date, machine, versions, figures) to bench/RESULTS.md."""
    if not enabled:
        return
    m = machine()
    v = versions(extra_versions)
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cmd = "python " + " ".join([f"bench/{Path(argv[0]).name}", *argv[1:]])
    lines = [
        f"### {title} — {now}",
        "",
        f"- command: `{cmd}`",
        f"- machine: {m['cpu']}, {m['cores']} cores usable ({m['logical_cpus']} logical), {m['ram_gib']} GiB RAM"
        + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU") + f"; {m['os']}",
        f"- load average (1/5/15 min) before/after: {load_before or '?'} / {load()}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; repo {git_rev()}",
        "",
        table.rstrip(),
        "",
    ]
    if notes:
        lines += [notes.rstrip(), ""]
    if not RESULTS.exists():
        RESULTS.write_text("# featlab benchmark results\n\nAppended by the scripts in bench/ (see bench/README.md). "
                           "Newest runs at the bottom.\n\n## Runs\n\n")
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nappended to {RESULTS}")


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:,.3g}" if abs(x) < 10 else f"{x:,.0f}" if abs(x) >= 1000 else f"{x:,.1f}"
        return str(x)

    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------- data
def source_manifest(path: str | None = None) -> Path:
    """The 8,000-image real UTKFace manifest: --manifest, or prepared once from the shared sample."""
    if path:
        return Path(path)
    src = SAMPLE_DIR if TINY else UTK_DIR
    out = workdir() / ("utkface-sample.csv" if TINY else "utkface-all.csv")
    if not out.is_file():
        from featlab.data.datasets import prepare_dataset
        from featlab.data.manifest import write_manifest

        if not src.is_dir():
            sys.exit(f"no manifest: pass --manifest, or put the UTKFace sample at {src}")
        df, _ = prepare_dataset("utkface", src)
        write_manifest(df, out)
    return out


def sub_manifest(n: int, source: str | Path | None = None, name: str = "utk") -> Path:
    """A manifest of the first ``n`` rows of the source manifest (absolute paths kept)."""
    import pandas as pd

    src = source_manifest(str(source) if source else None)
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    if n > len(df):
        raise SystemExit(f"asked for {n} images, the manifest {src} has {len(df)}")
    base = src.parent
    df["path"] = [p if os.path.isabs(p) else str((base / p).resolve()) for p in df["path"]]
    out = workdir() / "manifests" / f"{name}{n}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    df.iloc[:n].to_csv(out, index=False)
    return out


def real_features(backbone: str, n: int, taps: list[str], model: str | None = None, source=None) -> Path:
    """A features file of ``taps`` for the first ``n`` real images, extracted once and cached (resumable)."""
    from featlab.features.extract import extract

    man = sub_manifest(n, source)
    out = workdir() / "features" / f"{backbone}-{n}.h5"
    t = time.perf_counter()
    rep = extract(man, taps, backbone=backbone, model=model, out=out, progress=False)
    if rep.rows_added or rep.filled:
        print(f"[bench] extracted {backbone} {taps} for {n} real images -> {out} ({time.perf_counter() - t:.0f} s)")
    return out


def r100_model() -> Path:
    """A random-weight IResNet-100 graph (PyTorch export style, full width, 112x112), built once."""
    out = workdir() / "r100-pytorch.onnx"
    if not out.is_file():
        import onnx

        from featlab.backbones.iresnet import build_iresnet

        print("[bench] building the random-weight R100 graph (once) ...", flush=True)
        onnx.save(build_iresnet(100, "pytorch"), str(out) + ".tmp")
        os.replace(str(out) + ".tmp", out)
    return out


# ----------------------------------------------------------------------- timing
class Stopwatch:
    def __enter__(self):
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------- scripts
def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--manifest", default=None, help="source manifest [prepared from ../shared/data/utkface-dev]")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--tiny", action="store_true", help="a smoke run of a few seconds on the 600-face sample shipped "
                                                         "in featlab: figures not meaningful, nothing recorded")
    return ap


def child_result(cmd: list[str], **kw) -> dict:
    """Run a child process that prints one ``RESULT {json}`` line; return that JSON."""
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"child {cmd[1:3]} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
