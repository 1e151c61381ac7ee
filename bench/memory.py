"""Memory benchmark: peak RSS of extraction (1,000 vs 8,000 images) and of streamed head training.

Each measured run is a fresh subprocess (``python bench/memory.py --child ...``) that
reports its own peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``) and
that of its own children (decode/align worker processes, when the extractor uses
them). The parent only compares.

1. Extraction, dlib-age default taps (res3, res4, res5), real UTKFace images, into a
   new file: 2,000 vs 8,000 images. Streaming means the peak does not grow with the
   number of images (target: 8,000 / 2,000 <= 1.2x). Both sizes are large enough for the
   run-time tuner (from 12 batches), whose second onnxruntime session is a fixed ~130 MiB:
   with ``--small 1000`` (no tuning) the ratio measures the tuner, not the streaming.
2. Head training (``featlab.heads.train.fit_head``) on dlib-age ``res3`` of 8,000 images
   (6,272 values per row: ~140 MB of float32 train rows), once with a memory budget
   larger than that (rows read in one go) and once with ``memory_mb`` far
   below it (streamed in chunks). The baseline is a process that imports TensorFlow
   and featlab.heads.train and reads the labels only.

Usage::

    python bench/memory.py                 # ~2-3 min on 2 cores
    python bench/memory.py --epochs 5 --budget-mb 16
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _peaks() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {"rss_mib": round(me, 1), "children_rss_mib": round(kids, 1)}


def child(argv: list[str]) -> None:
    kind = argv[0]
    t = time.perf_counter()
    out = {}
    if kind == "extract":
        from featlab.features.extract import extract

        man, dest = argv[1], argv[2]
        rep = extract(man, [], backbone="dlib-age", out=dest, progress=False)
        out = {"rows": int(rep.rows_total), "plan": rep.plan, "file_mib": round(Path(dest).stat().st_size / 2**20, 1)}
    elif kind == "baseline-tf":
        import featlab.heads.train  # noqa: F401  (what a head run imports)
        import tensorflow  # noqa: F401
        from featlab.features.store import FeatureStore

        with FeatureStore.open_read(argv[1]) as s:
            s.labels()
    elif kind == "head":
        from featlab.heads.train import fit_head

        features, key, budget, epochs, root = argv[1], argv[2], float(argv[3]), int(argv[4]), argv[5]
        d = fit_head(features, key, "gender", out_root=root, epochs=epochs, patience=epochs, memory_mb=budget,
                     verbose=0)
        cfg = json.loads((Path(d) / "config.json").read_text())
        out = {"data_loading": cfg.get("data_loading"), "epochs": cfg["training"]["epochs_run"],
               "fit_seconds": cfg["training"]["fit_seconds"]}
    out.update(_peaks(), seconds=round(time.perf_counter() - t, 1))
    print("RESULT " + json.dumps(out), flush=True)


def run_child(*args) -> dict:
    return C.child_result([sys.executable, __file__, "--child", *map(str, args)],
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--small", type=int, default=2000, help="images of the small extraction [2000: tuned like the large one]")
    ap.add_argument("--large", type=int, default=8000)
    ap.add_argument("--head-tap", default="res3", help="dlib-age tap for the head runs [res3: 6,272 values/row]")
    ap.add_argument("--budget-mb", type=float, default=16, help="memory_mb of the streamed head run [16]")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per head run [3]")
    args = ap.parse_args(argv)
    tiny = C.tiny(args, small=16, large=32, epochs=1)
    n_feats = 64 if tiny else 8000
    load0 = C.load()
    rows = []
    with tempfile.TemporaryDirectory(dir=C.workdir()) as tmp:
        tmp = Path(tmp)
        ext = {}
        for n in (args.small, args.large):
            man = C.sub_manifest(n, args.manifest)
            r = run_child("extract", man, tmp / f"x{n}.h5")
            (tmp / f"x{n}.h5").unlink()
            ext[n] = r
            print(f"extract {n:5d} images: peak RSS {r['rss_mib']:.0f} MiB (workers {r['children_rss_mib']:.0f} MiB), "
                  f"{r['seconds']} s, file {r['file_mib']} MiB, plan {r['plan']}", flush=True)
        s, l_ = ext[args.small], ext[args.large]
        rows.append([f"extract dlib-age res3,res4,res5: {args.small} vs {args.large} images",
                     f"{s['rss_mib']:.0f} MiB", f"{l_['rss_mib']:.0f} MiB", l_["rss_mib"] / s["rss_mib"],
                     f"files {s['file_mib']} / {l_['file_mib']} MiB; {l_['seconds']} s for {args.large}"])

        feats = C.real_features("dlib-age", n_feats, ["res3", "res4", "res5"], source=args.manifest)
        from featlab.features.store import FeatureStore

        with FeatureStore.open_read(feats) as st:
            shape = tuple(int(v) for v in st.array(args.head_tap).shape)
        per_row = int(__import__("numpy").prod(shape[1:])) * 4
        train_mib = 0.7 * shape[0] * per_row / 2**20
        base = run_child("baseline-tf", feats)
        print(f"baseline (import TensorFlow + featlab.heads.train, read labels): {base['rss_mib']:.0f} MiB", flush=True)
        big = run_child("head", feats, args.head_tap, 4096, args.epochs, tmp / "heads-mem")
        print(f"head, budget 4096 MB ({big['data_loading']}): {big['rss_mib']:.0f} MiB", flush=True)
        small = run_child("head", feats, args.head_tap, args.budget_mb, args.epochs, tmp / "heads-stream")
        print(f"head, budget {args.budget_mb:g} MB ({small['data_loading']}): {small['rss_mib']:.0f} MiB", flush=True)
        # TensorFlow's own training footprint: the same head on a small tap (res5, 2,304 values/row), in memory
        tiny = run_child("head", feats, "res5", 4096, args.epochs, tmp / "heads-tiny")
        print(f"head on res5 in memory (~{0.7 * shape[0] * 2304 * 4 / 2**20:.0f} MiB train rows): "
              f"{tiny['rss_mib']:.0f} MiB", flush=True)
        rows.append([f"train_head gender on {args.head_tap} ({shape[1:]}, ~{train_mib:.0f} MiB float32 train rows): "
                     f"in memory vs streamed (budget {args.budget_mb:g} MB)",
                     f"{big['rss_mib']:.0f} MiB", f"{small['rss_mib']:.0f} MiB", small["rss_mib"] / big["rss_mib"],
                     f"baseline TF process {base['rss_mib']:.0f} MiB: +{big['rss_mib'] - base['rss_mib']:.0f} vs "
                     f"+{small['rss_mib'] - base['rss_mib']:.0f} MiB; {args.epochs} epochs "
                     f"{big['fit_seconds']} s vs {small['fit_seconds']} s"])
        rows.append(["TensorFlow training footprint: train_head gender on res5 (2,304 values/row, "
                     f"~{0.7 * shape[0] * 2304 * 4 / 2**20:.0f} MiB train rows) in memory, vs the import-only baseline",
                     f"{base['rss_mib']:.0f} MiB", f"{tiny['rss_mib']:.0f} MiB", tiny["rss_mib"] / base["rss_mib"],
                     "what any fit costs over importing TensorFlow, independent of the data size"])
    table = C.md_table(["run", "peak RSS A", "peak RSS B", "B / A", "notes"], rows)
    print("\n" + table)
    C.record("Memory", [sys.argv[0], *(argv if argv is not None else sys.argv[1:])], table, load_before=load0,
             enabled=not args.no_record)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
