"""Training a network from pixels on a manifest's own split, resumable, recorded exactly like a head.

Takes a manifest (``featlab prepare``), a target and an architecture (:mod:`featlab.heads.cnn`); gives the folder::

    {results}/cnn/{dataset}/manifest-{sha256[:12]}/{arch}-{size}[-10crop][-{backbone}-{preprocessing}]/{target}/[fold{K}/]
        cnn.keras       the network: input = a size x size crop of the chip (uint8 values as float)
        config.json     what made it: manifest and its sha256, chips (backbone, preprocessing, side), crops,
                        prediction, every hyperparameter, seed, counts, training summary
        metrics.json    val and test sections with intervals over people, as a head's (``kind: cnn``)
        faces.csv       per-face values with groups (what comparisons pair); confusion, scatter, subgroups,
                        predictions, history.csv/.png

(:func:`featlab.paths.cnn_dir`). The chips are those extraction cuts with the chosen backbone's preprocessing
(dlib-rec's by default), at 256/227 of the crop size (:mod:`featlab.features.pixels`). Rows, targets, the
range rules, the validation split (the manifest's, or the held-out groups of ``--fold K``) and the losses are the
heads' (:mod:`featlab.heads.train`); early stopping on validation restores the best epoch.

**Resumable.** After every epoch the weights, the optimizer's state, the best weights so far and the
early-stopping and learning-rate state go to ``{results}/.cnn-resume/{digest}/epoch-NNNN/`` (digest: everything
that changes the numbers). Each epoch's shuffling, crops, mirrors and dropout masks are drawn from (seed,
epoch) alone, so a run interrupted anywhere and started again continues from the last whole epoch and ends
with the numbers of an uninterrupted run. The record is written beside and swapped in when whole
(:mod:`featlab.staging`); the resume folder goes once the record is in place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from .. import __version__, config
from ..errors import FeatlabError
from ..staging import Stage, checkpoint
from .cnn import DEFAULT_ARCH, PREDICTIONS, check_arch, check_weights

#: the smallest crop the Levi & Hassner network takes (three 3/2 max-pools after a 7x7/4 convolution)
LH_MIN_SIZE = 63
RESUME = ".cnn-resume"


def check_cnn_options(target, cats, arch, size, weights, prediction, epochs, batch_size, lr, patience, ranges) -> dict:
    """One line on a bad option, before any image is read or TensorFlow loads."""
    from ..data.bins import get_scheme
    from ..data.labels import RANGE_POLICIES, TARGETS

    if target not in TARGETS:
        raise FeatlabError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "bins":
        get_scheme(cats)
    arch = check_arch(arch)
    size = int(size)
    if arch == DEFAULT_ARCH and size < LH_MIN_SIZE:
        raise FeatlabError(f"--size {size}: the Levi & Hassner network needs crops of at least {LH_MIN_SIZE} px")
    if size < 32:
        raise FeatlabError(f"--size must be at least 32 px, not {size}")
    if prediction not in PREDICTIONS:
        raise FeatlabError(f"--predict must be {' or '.join(PREDICTIONS)}, not {prediction!r}")
    for name, v in (("--epochs", epochs), ("--batch-size", batch_size), ("--patience", patience)):
        if int(v) < 1:
            raise FeatlabError(f"{name} must be at least 1, not {v}")
    if not float(lr) > 0:
        raise FeatlabError(f"--lr must be a positive number, not {lr}")
    if ranges not in RANGE_POLICIES:
        raise FeatlabError(f"--ranges must be {' or '.join(RANGE_POLICIES)}, not {ranges!r}")
    return {"arch": arch, "size": size, "weights": check_weights(weights, arch)}


def cnn_key(arch: str, size: int, prediction: str, backbone: str, preprocessing: str, align: bool) -> str:
    """The folder a CNN is filed under: ``levi-hassner-227``, ``mobilenetv2-96-10crop``, ... plus the chips'
    backbone and preprocessing (``-align`` when detected and aligned) when they are not dlib-rec's own
    (its template, not aligned)."""
    k = f"{arch.lower()}-{int(size)}" + ("-10crop" if prediction == "10crop" else "")
    if backbone == "dlib-rec" and preprocessing == "template-5pt" and not align:
        return k
    return f"{k}-{backbone}-{preprocessing}" + ("-align" if align else "")


def train_cnn(manifest, target: str, cats=None, *, out_root=None, features_root=None, **kw) -> Path:
    """Train, score and record one CNN (see the module doc); returns its folder in the results."""
    root = Path(out_root) if out_root is not None else config.results_dir()
    with Stage(root) as st:
        d, resume = fit_cnn(manifest, target, cats, out_root=st.root, resume_root=root, features_root=features_root, **kw)
        final = st.install(d)
    shutil.rmtree(resume, ignore_errors=True)
    try:
        resume.parent.rmdir()
    except OSError:
        pass
    return final


def fit_cnn(manifest, target: str, cats=None, *, arch: str = DEFAULT_ARCH, size: int = 227, weights=None,
            backbone: str = "dlib-rec", preprocessing: str | None = None, align: bool = False, epochs: int = 60,
            batch_size: int = 64, lr: float = 1e-3, patience: int = 8, seed: int = 0, fold=None,
            val_share: float = 0.1, prediction: str = "center", ranges: str = "refuse", age_sigma=None,
            out_root=None, resume_root=None, features_root=None, verbose=1) -> tuple[Path, Path]:
    """Train one CNN into ``out_root`` (a staging root); returns (its folder, its resume folder)."""
    from ..data.bins import get_scheme
    from ..data.labels import (check_ranges, class_names, dropped_reasons, encode_target, make_targets, split_rows,
                               target_name)
    from ..data.manifest import as_labels, dataset_name, read_manifest
    from ..features.pixels import full_side, load_chips
    from ..paths import cnn_dir

    if target != "bins":
        cats = None
    opts = check_cnn_options(target, cats, arch, size, weights, prediction, epochs, batch_size, lr, patience, ranges)
    arch, size, weights = opts["arch"], opts["size"], opts["weights"]
    if fold == "all":
        raise FeatlabError("fit_cnn trains one fold; featlab.study.workflow.train_cnn runs --fold all")
    fold = None if fold is None else int(fold)
    t_start = time.perf_counter()
    manifest = Path(manifest)
    chips = load_chips(manifest, backbone, preprocessing, full_side(size), align, root=features_root,
                       verbose=bool(verbose))
    made = chips.meta
    prep_name = made["preprocessing"]["name"]
    labels = as_labels(read_manifest(manifest).iloc[chips.rows])
    tname = target_name(target, cats)
    y_all, valid = encode_target(labels, target, cats)
    range_info = check_ranges(labels, target, cats, ranges)
    if not valid.any():
        raise FeatlabError(f"no face of {manifest.name} has a usable {target} label")
    sp = split_rows(labels, valid, fold, val_share)
    tr, va, te = sp["train"], sp["val"], sp["test"]
    if not len(tr) or not len(va):
        raise FeatlabError(f"{manifest.name}: {len(tr)} train and {len(va)} val faces with a {target} label; "
                           "a CNN needs both (early stopping is on validation)")
    n_classes = get_scheme(cats).n if target == "bins" else (2 if target == "gender" else 1)
    if target != "age" and len(set(y_all[tr].tolist())) < 2:
        raise FeatlabError(f"the training faces hold a single class of {tname}; nothing to learn")
    transform, age_grid, kind = None, None, ("expectation" if target == "age" else "softmax")
    if target == "age":
        a = y_all[tr].astype(np.float64)
        transform = {"kind": "z", "mean": float(a.mean()), "scale": float(a.std() or 1.0)}
        g = np.arange(0.0, np.ceil(float(np.max(y_all[tr]))) + 1.0)
        age_grid = (g - transform["mean"]) / transform["scale"]
    hp = {"arch": arch, "size": size, "weights": str(weights) if weights else None, "epochs": int(epochs),
          "batch_size": int(batch_size), "lr": float(lr), "optimizer": "adam", "patience": int(patience),
          "reduce_lr": {"factor": 0.5, "patience": max(2, int(patience) // 3), "min_lr": float(lr) / 64},
          "val_share": float(val_share), "prediction": prediction, "ranges": ranges,
          "age_sigma": (2.0 if age_sigma is None else float(age_sigma)) if target == "age" else 0.0,
          "label_smoothing": 0.0, "age_loss": "mae", "augmentation": "random crops of the chip, mirrored with p 1/2",
          "monitor": "val_loss"}
    key = cnn_key(arch, size, prediction, backbone, prep_name, align)
    out = cnn_dir(dataset_name(manifest), made["manifest_sha256"], key, tname, fold, out_root)
    wsha = _sha(weights) if weights else None
    digest = hashlib.sha256(json.dumps({"manifest": made["manifest_sha256"], "chips": made["preprocessing"],
                                        "side": made["side"], "align": bool(align), "target": tname, "fold": fold,
                                        "seed": int(seed), "hp": hp, "weights_sha256": wsha, "version": 1},
                                       sort_keys=True).encode()).hexdigest()[:16]
    resume = Path(resume_root if resume_root is not None else config.results_dir()) / RESUME / digest
    if verbose:
        print(f"[featlab] cnn {key} -> {tname}{'' if fold is None else f' fold {fold}'} on {manifest.name}: train "
              f"{len(tr)}, val {len(va)}, test {len(te)} faces ({len(chips.skipped)} images gave no chip; "
              f"{int((~valid).sum())} without {target})")

    from .train import _setup_tf, loss_and_metrics

    keras, tf = _setup_tf(seed)
    from .cnn import build_cnn, center_crops

    mean, std = _channel_stats(chips.chips, tr, size)
    plan = {"kind": kind, "transform": transform, "age_grid": age_grid}
    model = build_cnn(arch, size, n_classes, kind, mean, std, age_grid, weights)
    loss, metrics = loss_and_metrics(plan, hp)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=float(lr)), loss=loss, metrics=metrics)
    y_tr = make_targets(target, False, n_classes, y_all[tr], transform)
    y_va = make_targets(target, False, n_classes, y_all[va], transform)
    x_va = center_crops(np.asarray(chips.chips[va]), size)
    h, lrs, state = _fit_resumable(keras, model, chips.chips, tr, y_tr, x_va, y_va, size, hp, int(seed), resume,
                                   verbose, f"cnn {key} -> {tname}")
    fit_seconds = state["seconds"]  # every epoch's wall time, those of an interrupted run included

    cfg = {
        "featlab_version": __version__,
        "kind": "cnn",
        "backbone": "cnn",
        "arch": arch,
        "manifest": str(manifest.resolve()),
        "manifest_sha256": made["manifest_sha256"],
        "dataset": dataset_name(manifest),
        "dataset_key": dataset_name(manifest),
        "feature_set": {"dataset": dataset_name(manifest), "manifest_sha256": made["manifest_sha256"],
                        "backbone": "cnn", "preprocessing": made["preprocessing"], "align": bool(align),
                        "flip": False, "imported": False},
        "tap": key,
        "head_key": key,
        "chips": {"backbone": backbone, "preprocessing": made["preprocessing"], "side": made["side"],
                  "crop": size, "cache": str(chips.path), "skipped": len(chips.skipped), "align": bool(align)},
        "input": f"{size}x{size} crops of {made['side']}x{made['side']} chips (RGB 0..255), standardised per "
                 "channel on the train chips",
        "channel_mean": [round(float(v), 6) for v in mean], "channel_std": [round(float(v), 6) for v in std],
        "prediction": {"center": "the centre crop", "10crop": "the mean output over 10 crops (corners, centre, "
                       "mirrored)"}[prediction],
        "target": target, "target_name": tname, "cats": int(cats) if cats is not None else None,
        "class_names": class_names(target, cats),
        "n_outputs": len(age_grid) if kind == "expectation" else n_classes,
        "age_grid": age_grid.round(6).tolist() if age_grid is not None else None,
        "output": kind, "target_transform": transform,
        "fold": fold, "split_note": sp["note"],
        "hyperparameters": hp, "seed": int(seed), "weights_sha256": wsha,
        "counts": {"train": int(len(tr)), "val": int(len(va)), "test": int(len(te)),
                   "dropped_missing_target": int((~valid).sum()), "dropped": dropped_reasons(labels, target, valid),
                   "no_chip": len(chips.skipped), "rows_in_manifest": int(len(chips.rows) + len(chips.skipped))},
        "ranges": range_info,
        "params": int(model.count_params()),
        "training": {"epochs_run": len(h["loss"]), "best_epoch": state["best_epoch"],
                     "stopped_early": len(h["loss"]) < int(epochs), "fit_seconds": round(fit_seconds, 2),
                     "resumed_at_epoch": state.get("resumed_at"), "final_lr": lrs[-1] if lrs else float(lr),
                     "best_val_loss": float(min(h["val_loss"])),
                     "cpu_seconds": round(state.get("cpu_seconds", 0.0), 1)},
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "cnn.keras")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    from .train import _write_history

    _write_history(out, h, lrs, cfg)
    record_cnn(model, cfg, chips.chips, labels, {"val": va, "test": te}, sp["note"], out)
    cfg["training"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if verbose:
        t = json.loads((out / "metrics.json").read_text()).get("test") or {}
        figs = ", ".join(f"{m} {v:.4g}" for m, v in (t.get("metrics") or {}).items() if m in ("accuracy", "one_off", "mae"))
        print(f"[featlab] {out}: {len(h['loss'])} epochs (best {state['best_epoch']}), "
              f"{time.perf_counter() - t_start:.0f} s; test {figs}")
    return out, resume


def _sha(path) -> str:
    from ..backbones.registry import sha256_of

    return sha256_of(Path(path))


def _channel_stats(chips, rows, size: int, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (0..255) of the train chips' centre crops."""
    from .cnn import center_crops

    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    rows = np.sort(rows)
    for a in range(0, len(rows), block):
        x = center_crops(np.asarray(chips[rows[a : a + block]]), size).astype(np.float64)
        s += x.sum(axis=(0, 1, 2))
        s2 += np.square(x).sum(axis=(0, 1, 2))
        n += x.shape[0] * x.shape[1] * x.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 1e-6))
    return mean, std


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _reseed(model, seed: int, epoch: int) -> None:
    """Every dropout mask of epoch ``epoch`` drawn from (seed, epoch, layer) alone: the same after a resume."""
    for i, layer in enumerate(_all_layers(model)):
        gen = getattr(layer, "seed_generator", None)
        if gen is not None:
            s = int(np.random.SeedSequence([seed, epoch, i]).generate_state(1)[0])
            gen.state.assign(np.array([s, 0], dtype=gen.state.dtype))


def _batches(keras, chips, rows, y, size, batch, seed, epoch):
    """The epoch's train batches: a permutation of the train faces, random crops and mirrors, all from (seed, epoch)."""
    from .cnn import crop_offsets, train_crops

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(rows))
    full = chips.shape[1]
    top, left, mirror = crop_offsets(len(rows), full, size, rng)

    class _Epoch(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False, max_queue_size=2)

        def __len__(self):
            return -(-len(rows) // batch)

        def __getitem__(self, i):
            idx = order[i * batch : (i + 1) * batch]
            srt = np.argsort(rows[idx], kind="stable")  # read the memory map in order
            inv = np.empty_like(srt)
            inv[srt] = np.arange(len(srt))
            c = np.asarray(chips[rows[idx][srt]])[inv]
            return train_crops(c, size, top[idx], left[idx], mirror[idx]), y[idx]

    return _Epoch()


def _save_state(resume: Path, epoch: int, model, state: dict) -> None:
    """Epoch ``epoch``'s state into ``resume/epoch-NNNN`` (complete once ``done`` is there), older ones removed."""
    d = resume / f"epoch-{epoch:04d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    np.savez(d / "weights.npz", *model.get_weights())
    np.savez(d / "optimizer.npz", *[np.asarray(v) for v in model.optimizer.variables])
    np.savez(d / "best.npz", *state["best_weights"])
    (d / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "best_weights"}))
    (d / "done").write_text("")
    for old in resume.glob("epoch-*"):
        if old != d:
            shutil.rmtree(old, ignore_errors=True)


def _load_state(resume: Path, model):
    done = sorted(p.parent for p in resume.glob("epoch-*/done"))
    if not done:
        return None
    d = done[-1]
    state = json.loads((d / "state.json").read_text())

    def arrays(name):
        with np.load(d / name) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]

    model.set_weights(arrays("weights.npz"))
    opt = model.optimizer
    opt.build(model.trainable_variables)
    saved = arrays("optimizer.npz")
    if len(saved) != len(opt.variables) or any(tuple(a.shape) != tuple(v.shape) for a, v in zip(saved, opt.variables)):
        return None  # another optimizer layout (another Keras): start again rather than resume wrongly
    for v, a in zip(opt.variables, saved):
        v.assign(a)
    state["best_weights"] = arrays("best.npz")
    return state


def _fit_resumable(keras, model, chips, tr, y_tr, x_va, y_va, size, hp, seed, resume: Path, verbose, label):
    from ..progress import Bar

    epochs, patience = hp["epochs"], hp["patience"]
    rl = hp["reduce_lr"]
    state = _load_state(resume, model) if resume.is_dir() else None
    if state is None:
        state = {"epoch": 0, "history": {}, "lrs": [], "best": None, "best_epoch": 0, "wait": 0,
                 "lr": hp["lr"], "best_weights": model.get_weights(), "cpu_seconds": 0.0, "seconds": 0.0}
    else:
        state["resumed_at"] = state["epoch"]
        if verbose:
            print(f"[featlab] {label}: resuming after epoch {state['epoch']} (from {resume})")
    steps = -(-len(tr) // hp["batch_size"])
    bar = Bar((epochs - state["epoch"]) * steps, f"{label}: epochs {state['epoch'] + 1}-{epochs}", "batch",
              enabled=bool(verbose))

    class _Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            bar(1)

    with bar:
        for epoch in range(state["epoch"], epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            model.optimizer.learning_rate.assign(state["lr"])
            _reseed(model, seed, epoch)
            data = _batches(keras, chips, tr, y_tr, size, hp["batch_size"], seed, epoch)
            hist = model.fit(data, validation_data=(x_va, y_va), validation_batch_size=256, epochs=1, verbose=0,
                             shuffle=False, callbacks=[_Tick()])
            for k, v in hist.history.items():
                if k != "learning_rate":
                    state["history"].setdefault(k, []).append(float(v[-1]))
            state["lrs"].append(float(state["lr"]))
            val = state["history"]["val_loss"][-1]
            if state["best"] is None or val < state["best"]:
                state.update(best=val, best_epoch=epoch + 1, wait=0, best_weights=model.get_weights())
            else:
                state["wait"] += 1
                if state["wait"] % rl["patience"] == 0:
                    state["lr"] = max(state["lr"] * rl["factor"], rl["min_lr"])
            state["epoch"] = epoch + 1
            state["cpu_seconds"] += time.process_time() - c0
            state["seconds"] += time.perf_counter() - t0
            stop = state["wait"] >= patience
            _save_state(resume, epoch + 1, model, state)
            checkpoint("cnn-epoch")
            if stop:
                break
    model.set_weights(state["best_weights"])
    return state["history"], state["lrs"], state


def record_cnn(model, cfg: dict, chips, labels, rows: dict, note: str, out: Path) -> dict:
    """Score the CNN on its val and test faces and write its record as a head's (``metrics.json``, ``faces.csv``,
    confusion, scatter, subgroups, predictions)."""
    from ..data.labels import encode_target
    from ..scoring.scores import record_fields, score_predictions, write_scored
    from .cnn import predict_raw
    from .model import outputs_to_prediction

    y_all, _ = encode_target(labels, cfg["target"], cfg.get("cats"))
    prediction = cfg["hyperparameters"]["prediction"]

    def score(split):
        r = np.asarray(rows[split], dtype=np.int64)
        if not len(r):
            return None
        raw = predict_raw(model, np.asarray(chips[r]), cfg["hyperparameters"]["size"], prediction)
        return score_predictions(cfg["target"], cfg.get("cats"), y_all[r], outputs_to_prediction(raw, cfg),
                                 labels.iloc[r], cfg.get("class_names"))

    sections, files = write_scored(out, cfg, score)
    result = {**record_fields("cnn", out, cfg, sections, note, files), "manifest": cfg["manifest"]}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
