"""Heads benchmark: a grid of heads in one pass (``featlab.study.workflow.train_grid``) against the same heads
trained one by one (``featlab.study.workflow.train_head``).

Same real features (dlib-rec taps of the UTKFace development set, extracted once and cached, or
``--features``), same hyperparameters (train_head's defaults), same seed. Both sides do the whole job:
train, score on val and test (``record_head``) and fit the baselines (``--no-baselines``: not). The
sequential side fits each head's linear probe alone with scikit-learn; the grid's probes share their work
(:class:`featlab.heads.baselines.ProbeCache`: each tap read and standardised once, one Gram matrix and
preconditioner per tap for every target, C and alpha, each C solved by a preconditioned L-BFGS and finished
by scikit-learn) and are fitted in worker threads while the heads are saved and scored
(:mod:`featlab.heads.probepool`). By default both sides run in this process, TensorFlow started before either
clock; ``--cli`` runs them as users do, ``featlab train-head`` processes. Reported: wall time of each
side and their ratio (goal: the grid at least 3x faster), the summed fit seconds, and per head the
sequential head's test figure with its 95 % bootstrap interval beside the grid head's (goal: every
grid head inside the interval).

Usage::

    python bench/heads.py                                   # res12, res14, embedding x bins8, age, gender
    python bench/heads.py --features F.h5 --taps res14,embedding --targets gender
    python bench/heads.py --no-baselines                    # train and score only (the part the grid changes)
    python bench/heads.py --cli                             # as users run it: train-head processes
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _targets(text: str):
    out = []
    for t in text.split(","):
        t = t.strip()
        out.append(("bins", int(t[4:])) if t.startswith("bins") else (t, None))
    return out


def _figures(d: Path) -> dict:
    m = json.loads((Path(d) / "metrics.json").read_text())
    return {"test": m["test"]["metrics"], "val": m["val"]["metrics"], "n": m["test"]["n"],
            "training": m["config"]["training"]}


def _cli(feats: Path, taps: list[str], targets, where: Path, epochs) -> list[Path]:
    """``featlab train-head`` in a process of its own, run in ``where`` (its results/ there); the heads'
    record folders, tap-major in ``targets`` order."""
    import subprocess

    from featlab.data.labels import target_name

    where.mkdir(parents=True, exist_ok=True)
    names = [target_name(t, c) for t, c in targets]
    cmd = [sys.executable, "-m", "featlab.cli", "train-head", "-f", str(feats), *[a for tap in taps for a in ("-l", tap)],
           "--target", ",".join(names), "-q", *(["--epochs", str(epochs)] if epochs else [])]
    p = subprocess.run(cmd, cwd=where, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    found = {}
    for m in (where / "results").rglob("metrics.json"):
        rec = json.loads(m.read_text())
        found[(rec.get("tap"), rec.get("target_name"))] = m.parent
    return [found[(tap, n)] for tap in taps for n in names]


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--features", default=None, help="a dlib-rec features file with the taps [extracted once]")
    ap.add_argument("--taps", default="res12,res14,embedding", help="comma list of taps [res12,res14,embedding]")
    ap.add_argument("--targets", default="bins8,age,gender", help="comma list of bins5/7/8, age, gender")
    ap.add_argument("--epochs", type=int, default=None, help="epochs (early stopping on val) [train_head's default]")
    ap.add_argument("--no-baselines", action="store_true", help="neither side fits the baselines (time the heads only)")
    ap.add_argument("--cli", action="store_true", help="as a user runs it: `featlab train-head` processes, one per head "
                                                       "against one for the grid (each pays its start-up)")
    args = ap.parse_args(argv)
    if args.cli and args.no_baselines:
        ap.error("--cli runs train-head as users do, with its baselines: drop --no-baselines")
    tiny = C.tiny(args, taps="embedding", targets="gender,age", epochs=1)
    load0 = C.load()
    taps = [t.strip() for t in args.taps.split(",") if t.strip()]
    targets = _targets(args.targets)
    feats = (Path(args.features) if args.features else
             C.real_features("dlib-rec", 160 if tiny else 8000, taps, source=args.manifest))
    from featlab.heads.keras_env import keras
    from featlab.data.labels import HEADLINE, target_name
    from featlab.study.workflow import train_grid, train_head

    if not args.cli:
        keras()  # TensorFlow's start-up is paid before either clock starts
    hp = {"epochs": args.epochs} if args.epochs else {}
    hp["baselines"] = not args.no_baselines
    with tempfile.TemporaryDirectory(dir=C.workdir()) as tmp:
        t = time.perf_counter()
        if args.cli:
            grid_dirs = _cli(feats.resolve(), taps, targets, Path(tmp) / "grid", args.epochs)
        else:
            grid_dirs = train_grid(feats, taps, targets, out_root=Path(tmp) / "grid", verbose=0, **hp)
        t_grid = time.perf_counter() - t
        print(f"[bench] grid: {len(grid_dirs)} heads in {t_grid:.1f} s", flush=True)
        seq_dirs, t = [], time.perf_counter()
        for tap in taps:
            for target, cats in targets:
                t1 = time.perf_counter()
                if args.cli:
                    seq_dirs += _cli(feats.resolve(), [tap], [(target, cats)], Path(tmp) / "seq", args.epochs)
                else:
                    seq_dirs.append(train_head(feats, tap, target, cats, out_root=Path(tmp) / "seq", verbose=0, **hp))
                print(f"[bench] sequential {tap} -> {target_name(target, cats)}: {time.perf_counter() - t1:.1f} s",
                      flush=True)
        t_seq = time.perf_counter() - t
        rows, inside = [], 0
        for g, s in zip(grid_dirs, seq_dirs):
            fg, fs = _figures(g), _figures(s)
            tname = s.name
            target = json.loads((s / "metrics.json").read_text())["target"]
            m = HEADLINE[target][0]
            lo, hi = fs["test"][f"{m}_ci95"]
            ok = lo <= fg["test"][m] <= hi
            inside += ok
            pct = (lambda v: f"{v:.2f}") if m == "mae" else (lambda v: f"{100 * v:.1f}%")
            rows.append([s.parent.name, tname, m, f"{pct(fs['test'][m])} [{pct(lo)}, {pct(hi)}]", pct(fg["test"][m]),
                         "yes" if ok else "NO", pct(fs["val"][m]), pct(fg["val"][m]),
                         f"{fs['training']['epochs_run']} / {fg['training']['epochs_run']}",
                         f"{fs['training']['fit_seconds']:.1f}"])
        grid_fit = sum({json.dumps(_figures(g)["training"].get("grid", {}).get("taps_read_once")):
                        _figures(g)["training"]["grid"]["fit_seconds_all_heads"] for g in grid_dirs
                        if "grid" in _figures(g)["training"]}.values())
        seq_fit = sum(_figures(s)["training"]["fit_seconds"] for s in seq_dirs)
        n_test = _figures(seq_dirs[0])["n"]
    summary = (("baselines not fitted; " if args.no_baselines else "with baselines; ")
               + ("as users run it (train-head processes); " if args.cli else "in one process; ") + f"{len(seq_dirs)} heads ({', '.join(taps)} x {', '.join(target_name(t, c) for t, c in targets)}) on "
               f"{feats.name}: sequential {t_seq:.0f} s, grid {t_grid:.0f} s -> **{t_seq / t_grid:.2f}x** wall time "
               f"(training alone: {seq_fit:.0f} s summed vs {grid_fit:.0f} s, {seq_fit / max(grid_fit, 1e-9):.2f}x); "
               f"{inside} of {len(seq_dirs)} grid heads inside the sequential head's 95 % interval ({n_test:,} test faces).")
    header = ["tap", "target", "metric", "sequential test [95 % CI]", "grid test", "inside", "sequential val",
              "grid val", "epochs seq / grid", "seq fit s"]
    table = C.md_table(header, rows)
    print("\n" + summary + "\n\n" + table)
    started = ("each side as a user runs it, `featlab train-head` processes (one per head against one for the "
               "grid), each paying Python's, TensorFlow's and featlab's start-up" if args.cli else
               "TensorFlow was started before either clock")
    notes = (summary + " Both sides train and score (record_head: val and test"
             + ("" if args.no_baselines else ", and fit the baselines") + "); " + started + ". The grid (featlab.heads.grid) holds every head in one graph (own layers, loss, early "
             "stopping and best weights; one learning-rate schedule), heads reading a tap the same way share its "
             "standardised, dropped-out input and one wide first layer, one epoch is one traced loop, fed from one "
             "read of each tap" + ("" if args.no_baselines else "; its linear probes share each tap's read, "
             "standardisation and Gram matrix (featlab.heads.baselines.ProbeCache) and are fitted in worker threads while "
             "the heads are saved and scored (featlab.heads.probepool)") + ". The sequential side is "
             "train_head as users call it (Keras fit per head, each probe alone with scikit-learn).")
    C.record("Heads: grid vs sequential", [sys.argv[0], *(argv if argv is not None else sys.argv[1:])], table, notes,
             load_before=load0, extra_versions=("tensorflow-cpu", "tensorflow", "keras", "scikit-learn"),
             enabled=not args.no_record)


if __name__ == "__main__":
    main()
