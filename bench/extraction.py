"""Extraction benchmark: ``featlab.features.extract.extract`` end to end against bare onnxruntime loops.

For each backbone, on the same real UTKFace images, same model, same taps and
same batch size, interleaved ``--reps`` times (best run of each kept):

- **bare ORT**: a plain ``onnxruntime.InferenceSession`` (default options) whose
  outputs are the taps, run over batches that were decoded, cut and normalised
  before the clock starts. The upper bound for the network alone.
- **bare decode+ORT**: the loop a user would write by hand: for each batch,
  decode and cut the chips (featlab's own ``load_rgb`` + geometry), normalise,
  run; one thread, no file written.
- **featlab**: ``extract()`` into a new HDF5 file with its default settings
  (decode/align workers, onnxruntime threads, float16 store, per-batch commit).
  ``loop`` excludes opening the model, session and file (``ExtractReport.setup_seconds``);
  ``e2e`` is the whole call.

A per-stage profile (``--profile``, on by default for the dlib nets) shows where
the time goes: decode, landmarks, chip, normalisation, network (1 thread and
all threads), float16 + HDF5 append; and whether dlib releases the GIL.

Usage::

    python bench/extraction.py                  # dlib-age, dlib-rec, and a short R100 run (CPU, ~3 min)
    python bench/extraction.py --r100           # R100 only, more faces
    python bench/extraction.py --r100 --provider cuda --batch 256     # GPU figures
    python bench/extraction.py --models dlib-age --n-age 8000 --reps 3
    python bench/extraction.py --models dlib-rec,sface --n-rec 1000 --n-sface 1000   # SFace beside dlib-rec
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common as C  # noqa: E402

R100_TAPS = ["add_98", "stage3_unit15_conv1", "stage4_unit1_conv1"]


def providers_for(name: str) -> list[str]:
    from featlab.backbones.registry import default_providers

    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            sys.exit("--provider cuda: onnxruntime has no CUDAExecutionProvider here (pip install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return default_providers()


def bare_session(bb, taps, providers, threads: int = 0, spinning: bool | None = None):
    import onnxruntime as ort

    from featlab.backbones.taps import expose_outputs

    tensors = list(dict.fromkeys(t.tensor for t in taps))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    sess = ort.InferenceSession(expose_outputs(bb.onnx_model, tensors).SerializeToString(), so, providers=providers)
    names = [o.name for o in sess.get_outputs()]
    inp = sess.get_inputs()[0].name
    return lambda x: sess.run(names, {inp: x}), sess.get_providers()[0]


def prep_chips(paths, geometry) -> np.ndarray:
    from featlab.data.images import load_rgb

    return np.stack([geometry.chip(load_rgb(p)) for p in paths])


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (decode/align workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bench_bare(run, xs, gpu: bool = False) -> tuple[float, float]:
    # warm up: first-run allocations; on a GPU a full batch, so that cuDNN's algorithm search is not timed
    run(xs[0] if gpu else xs[0][: min(len(xs[0]), 8)])
    n = sum(len(x) for x in xs)
    t, c = time.perf_counter(), cpu_seconds()
    for x in xs:
        run(x)
    return n / (time.perf_counter() - t), (cpu_seconds() - c) / n * 1e3


def bench_bare_decode(run, bb, paths, batch) -> tuple[float, float]:
    from featlab.data.images import load_rgb

    g = bb.geometry
    t, c = time.perf_counter(), cpu_seconds()
    for i in range(0, len(paths), batch):
        chips = np.stack([g.chip(load_rgb(p)) for p in paths[i : i + batch]])
        run(bb.to_input(chips))
    return len(paths) / (time.perf_counter() - t), (cpu_seconds() - c) / len(paths) * 1e3


def bench_featlab(man, taps, name, model, batch, providers, tmp: Path, threads: int = 0, workers: int = 0):
    from featlab.features.extract import extract

    out = tmp / f"{name}-{time.time_ns()}.h5"
    c = cpu_seconds()
    rep = extract(man, taps, backbone=name, model=model, out=out, batch_size=batch, progress=False, providers=providers,
                  threads=threads, workers=workers or None)
    cpu = cpu_seconds() - c
    n = rep.rows_added + rep.skipped_added
    out.unlink(missing_ok=True)
    return n / max(1e-9, rep.seconds - rep.setup_seconds), rep.images_per_s, rep, cpu / max(1, n) * 1e3


def profile(bb, taps, paths, batch, providers, tmp: Path) -> tuple[list, str]:
    """Single-thread cost of each stage, ms per image, on ``paths``."""
    import dlib

    from featlab.data import faces
    from featlab.data.images import load_rgb
    from featlab.features.store import FeatureStore, label_row

    rows = []

    def stage(label, fn, n):
        fn()  # warm
        t = time.perf_counter()
        fn()
        rows.append([label, (time.perf_counter() - t) / n * 1e3])

    g = bb.geometry
    stage("read file (bytes)", lambda: [open(p, "rb").read() for p in paths], len(paths))
    stage("decode JPEG -> RGB (load_rgb)", lambda: [load_rgb(p) for p in paths], len(paths))
    imgs = [load_rgb(p) for p in paths]
    if g.kind == "dlib-chip":
        _, _, pred = faces._dlib()
        rects = [dlib.rectangle(0, 0, im.shape[1] - 1, im.shape[0] - 1) for im in imgs]
        stage("dlib 5-point landmarks", lambda: [pred(im, r) for im, r in zip(imgs, rects)], len(imgs))
        shapes = [pred(im, r) for im, r in zip(imgs, rects)]
        stage(f"dlib get_face_chip {g.size}px", lambda: [dlib.get_face_chip(im, s, size=g.size, padding=g.padding)
                                                     for im, s in zip(imgs, shapes)], len(imgs))
    else:
        stage(f"{g.preprocessing} chip {g.size}px ({g.kind})", lambda: [g.chip(im) for im in imgs], len(imgs))
    chips = np.stack([g.chip(im) for im in imgs])
    xs = [chips[i : i + batch] for i in range(0, len(chips), batch)]
    stage("normalise uint8 NHWC -> float32 NCHW", lambda: [bb.to_input(x) for x in xs], len(chips))
    inputs = [bb.to_input(x) for x in xs]
    for th, label in ((1, "network, 1 onnxruntime thread"), (0, "network, all cores (ORT default)")):
        run, _ = bare_session(bb, taps, providers, threads=th)
        stage(label, lambda: [run(x) for x in inputs], len(chips))
    run, _ = bare_session(bb, taps, providers)
    outs = [dict(zip([t.name for t in taps], run(x))) for x in inputs]

    def write():
        f = tmp / f"prof-{time.time_ns()}.h5"
        with FeatureStore.open_for_append(f, {"backbone": "bench"}) as s:
            for t in taps:
                s.ensure_array(t.name, t.shape, expected_rows=len(chips))
            lab = label_row({"image_id": "x" * 16, "path": "/p", "age": 1.0, "gender": "m", "race": "white",
                             "split": "train", "fold": -1})  # the store's own row builder: follows its table
            for o in outs:
                s.append({k: v for k, v in o.items()}, [lab] * len(next(iter(o.values()))))
        f.unlink()

    stage("float16 + HDF5 append + flush", write, len(chips))

    # does dlib release the GIL? the same landmark+chip work in 1 vs 2 threads
    gil = ""
    if g.kind == "dlib-chip" and (C.machine()["cores"] >= 2):
        def work(sl):
            for im in sl:
                g.chip(im)

        def timed(nt):
            ths = [threading.Thread(target=work, args=(imgs[i::nt],)) for i in range(nt)]
            t = time.perf_counter()
            [x.start() for x in ths]
            [x.join() for x in ths]
            return time.perf_counter() - t

        timed(1)
        t1, t2 = timed(1), timed(2)
        gil = (f"dlib landmarks+chip in 2 threads vs 1: {t1 / t2:.2f}x the rate "
               f"({'holds the GIL: threads do not scale' if t1 / t2 < 1.3 else 'releases the GIL'})")
    return rows, gil


def run_model(name, args, providers, tmp):
    from featlab.backbones.registry import Backbone
    from featlab.features.extract import cpu_count

    n = {"dlib-age": args.n_age, "dlib-rec": args.n_rec, "sface": args.n_sface, "r100": args.n_r100}[name]
    if name == "r100" and not n:
        n = 8000 if providers[0] != "CPUExecutionProvider" else (200 if args.r100 else 48)
    model = str(C.r100_model()) if name == "r100" else None
    bb = Backbone(name, model)
    taps_req = R100_TAPS if name == "r100" else list(bb.spec.default_taps)
    taps = [bb.tap(t) for t in taps_req]
    batch = args.batch or bb.spec.default_batch
    man = C.sub_manifest(n, args.manifest)
    import pandas as pd

    paths = pd.read_csv(man)["path"].tolist()
    print(f"\n== {name}: {n} real UTKFace images, taps {taps_req}, batch {batch}, {providers[0]}", flush=True)

    prof_rows, gil = [], ""
    if args.profile and name != "r100":
        prof_rows, gil = profile(bb, taps, paths[: min(len(paths), 256)], batch, providers, tmp)
        for label, ms in prof_rows:
            print(f"   {label:40s} {ms:8.3f} ms/img")
        if gil:
            print("   " + gil)

    t = time.perf_counter()
    chips = prep_chips(paths, bb.geometry)
    xs = [bb.to_input(chips[i : i + batch]) for i in range(0, n, batch)]
    print(f"   pre-decoded {n} chips for the bare loop in {time.perf_counter() - t:.1f} s", flush=True)
    run, prov = bare_session(bb, taps, providers)
    res = {"bare": [], "bare_decode": [], "featlab": [], "featlab_e2e": []}
    cpu = {"bare": [], "bare_decode": [], "featlab": []}
    plan = {}
    reps = args.reps if name != "r100" else (args.r100_reps or (1 if args.r100 else 2))
    for r in range(reps):
        rate, c = bench_bare(run, xs, gpu=prov != "CPUExecutionProvider")
        res["bare"].append(rate)
        cpu["bare"].append(c)
        print(f"   rep {r + 1}: bare ORT            {rate:9.1f} img/s  ({c:.2f} CPU-ms/img)", flush=True)
        if name != "r100" or args.r100_decode:
            rate, c = bench_bare_decode(run, bb, paths, batch)
            res["bare_decode"].append(rate)
            cpu["bare_decode"].append(c)
            print(f"   rep {r + 1}: bare decode+ORT     {rate:9.1f} img/s  ({c:.2f} CPU-ms/img)", flush=True)
        loop, e2e, rep, c = bench_featlab(man, taps_req, name, model, batch, providers, tmp, args.featlab_threads,
                                          args.featlab_workers)
        res["featlab"].append(loop)
        res["featlab_e2e"].append(e2e)
        cpu["featlab"].append(c)
        plan = rep.plan
        print(f"   rep {r + 1}: featlab extract     {loop:9.1f} img/s  ({c:.2f} CPU-ms/img; e2e {e2e:.1f} img/s, setup "
              f"{rep.setup_seconds:.1f} s; {plan})", flush=True)
    best = {k: (max(v) if v else float("nan")) for k, v in res.items()}
    cbest = {k: (min(v) if v else float("nan")) for k, v in cpu.items()}
    row = [name, n, batch, prov.replace("ExecutionProvider", ""), best["bare"], best["bare_decode"], best["featlab"],
           best["featlab_e2e"], best["featlab"] / best["bare"],
           (best["featlab"] / best["bare_decode"]) if res["bare_decode"] else float("nan"),
           f"{cbest['bare']:.2f} / {cbest['bare_decode']:.2f} / {cbest['featlab']:.2f}",
           f"{plan.get('workers')} {plan.get('prep')} workers, ORT threads {plan.get('threads') or cpu_count()}"
           + (f" (timed shared/split: {plan['tuning'].get('shared')}/{plan['tuning'].get('split')} img/s)"
              if plan.get("tuning") else "")]
    return row, prof_rows, gil


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--models", default="dlib-age,dlib-rec,r100", help="comma list of dlib-age, dlib-rec, sface, r100")
    ap.add_argument("--r100", action="store_true", help="R100 only (same as --models r100), 200 faces on CPU")
    ap.add_argument("--n-age", type=int, default=3000, help="images for dlib-age [3000]")
    ap.add_argument("--n-rec", type=int, default=600, help="images for dlib-rec [600]")
    ap.add_argument("--n-sface", type=int, default=1000, help="images for sface (needs featlab[sface]) [1000]")
    ap.add_argument("--n-r100", type=int, default=0, help="images for R100 [48 in the default run, 200 with --r100, "
                                                           "8000 on a GPU]")
    ap.add_argument("--batch", type=int, default=0, help="batch size [each backbone's default]")
    ap.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions; the best of each is kept [2]")
    ap.add_argument("--r100-reps", type=int, default=0, help="repetitions for R100 [2; 1 with --r100]")
    ap.add_argument("--r100-decode", action="store_true", help="also time the bare decode+ORT loop for R100")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-stage profile")
    ap.add_argument("--featlab-threads", type=int, default=0,
                    help="force extract(threads=N) (onnxruntime intra-op threads; 0: featlab's plan, timed on CPU)")
    ap.add_argument("--featlab-workers", type=int, default=0, help="force extract(workers=N) (0: featlab's plan)")
    args = ap.parse_args(argv)
    C.tiny(args, n_age=16, n_rec=16, n_sface=16, n_r100=8, reps=1, r100_reps=1,
           **({"models": "dlib-rec"} if args.models == ap.get_default("models") else {}))  # no R100 build unless asked
    models = ["r100"] if args.r100 else [m.strip() for m in args.models.split(",") if m.strip()]
    providers = providers_for(args.provider)
    load0 = C.load()
    rows, profs = [], []
    with tempfile.TemporaryDirectory(dir=C.workdir()) as tmp:
        for m in models:
            row, prof, gil = run_model(m, args, providers, Path(tmp))
            rows.append(row)
            if prof:
                profs.append((m, prof, gil))
    header = ["backbone", "images", "batch", "provider", "bare ORT img/s", "bare decode+ORT img/s",
              "featlab img/s (loop)", "featlab img/s (e2e)", "featlab / bare ORT", "featlab / bare decode+ORT",
              "CPU-ms/img bare / bare decode / featlab (whole call)", "featlab plan"]
    table = C.md_table(header, rows)
    print("\n" + table)
    notes = []
    for m, prof, gil in profs:
        total = sum(ms for label, ms in prof if not label.startswith(("network, all", "read file")))
        notes.append(f"Where the time goes, {m} (single thread, ms per image; network also with all cores):\n")
        notes.append(C.md_table(["stage", "ms/img"], prof))
        notes.append(f"\nCPU per image with a 1-thread network, all stages: {total:.2f} ms -> at most "
                     f"{C.machine()['cores'] * 1000 / total:,.0f} img/s on {C.machine()['cores']} cores if perfectly "
                     f"parallel." + (f" {gil}." if gil else "") + "\n")
    print("\n".join(notes))
    C.record("Extraction", [sys.argv[0], *(argv if argv is not None else sys.argv[1:])], table, "\n".join(notes),
             load_before=load0, enabled=not args.no_record)


if __name__ == "__main__":
    main()
