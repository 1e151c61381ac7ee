"""Extraction before/after: featlab at a git revision (default HEAD) against the working tree.

Each run is a fresh subprocess calling ``extract()`` with default settings on the
same real images; the revision's ``featlab/`` comes from ``git archive REF`` into a
temporary folder put first on PYTHONPATH. Versions alternate ``--reps`` times; the
best rate of each is kept. Rates are end to end (the whole ``extract()`` call);
CPU milliseconds per image include the process's start and imports.

Usage::

    python bench/before_after.py                 # dlib-age 3,000 + dlib-rec 600 images, HEAD vs working tree
    python bench/before_after.py --ref c680702 --reps 5
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

CHILD = r'''
import json, os, resource, sys
from featlab.features.extract import extract
man, bb, out = sys.argv[1], sys.argv[2], sys.argv[3]
rep = extract(man, [], backbone=bb, out=out, progress=False)
a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
n = rep.rows_added + rep.skipped_added
print("RESULT " + json.dumps({"rate": n / rep.seconds, "cpu_ms": (a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime) / n * 1e3,
                              "file": __import__("featlab").__file__}))
os.remove(out)
'''


def run(pythonpath: str | None, man: Path, bb: str, out: Path) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return C.child_result([sys.executable, "-c", CHILD, str(man), bb, str(out)], env=env, cwd=tempfile.gettempdir())


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--ref", default="HEAD", help="git revision to compare with [HEAD]")
    ap.add_argument("--n-age", type=int, default=3000)
    ap.add_argument("--n-rec", type=int, default=600)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    C.tiny(args, n_age=16, n_rec=0, reps=1)
    load0 = C.load()
    rows = []
    with tempfile.TemporaryDirectory(dir=C.workdir()) as tmp:
        tmp = Path(tmp)
        old = tmp / "ref"
        old.mkdir()
        tar = subprocess.run(["git", "archive", args.ref, "featlab"], cwd=C.ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=tar, check=True)
        for bb, n in (("dlib-age", args.n_age), ("dlib-rec", args.n_rec)):
            if not n:
                continue
            man = C.sub_manifest(n, args.manifest)
            res = {"before": [], "after": []}
            for r in range(args.reps):
                for v, pp in (("before", str(old)), ("after", str(C.ROOT))):
                    x = run(pp, man, bb, tmp / f"{v}.h5")
                    res[v].append(x)
                    print(f"{bb} {v:6s} {x['rate']:7.1f} img/s  {x['cpu_ms']:6.2f} CPU-ms/img  ({x['file']})", flush=True)
            b, a = max(x["rate"] for x in res["before"]), max(x["rate"] for x in res["after"])
            cb, ca = min(x["cpu_ms"] for x in res["before"]), min(x["cpu_ms"] for x in res["after"])
            rows.append([bb, n, b, a, a / b, cb, ca])
    table = C.md_table(["backbone", "images", f"{args.ref} img/s", "working tree img/s", "speed-up",
                        f"{args.ref} CPU-ms/img", "working tree CPU-ms/img"], rows)
    print("\n" + table)
    C.record(f"Extraction before/after ({args.ref} vs working tree)", [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
             table, f"End to end extract() in fresh processes, default settings, best of {args.reps}.", load_before=load0,
             enabled=not args.no_record)


if __name__ == "__main__":
    main()
