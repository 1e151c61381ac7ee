"""A grid of heads trained in one pass: every (tap, target) head side by side in one Keras model.

:func:`fit_grid` trains the heads of ``layers x targets`` in one process. The taps are read once (the
train and val rows of every target together, as float32) when they fit the memory budget; otherwise
the heads are split into groups of taps that fit, one fit per group, and a head whose tap alone does
not fit is trained on its own by :func:`featlab.train.fit_head` (streamed).

Within a group, one Keras model holds every head: each head is exactly
:func:`featlab.model.build_model` for its tap (or taps, for a fusion key ``a+b``) and target, with its
own input(s), standardisation, layers, output and loss. The training rows are the union of the heads'
train rows; a row outside a head's train rows (no such label, or another split) has sample weight 0
for that head's output, so each head learns from exactly its own rows. A callback scores every head
on its own val rows after each epoch (its val loss, and accuracy or MAE in years) and stops each head
as :class:`keras.callbacks.EarlyStopping` would alone: once its patience runs out its best weights are
kept and its history ends; the fit ends when every head has stopped or at ``epochs``. Once the
stopped heads hold a quarter of the running heads' input features, the fit restarts without them
(the same optimizer, so the others keep their Adam moments and step count), so that stopped heads
stop costing time.

Differences from training each head alone (why the figures are close, not identical):

- one optimizer: Adam (and AdamW) keeps per-parameter moments, so the heads' updates do not mix, but
  there is ONE learning rate. Alone, each head halves its rate after its own plateau
  (ReduceLROnPlateau); here the rate is halved when none of the heads still training has improved
  for ``max(2, patience // 3)`` epochs, so a head may run at a higher rate than alone;
- the batches are drawn from the union of the heads' train rows, so a head sees fewer of its own rows
  per batch when the targets' rows differ (and its loss is scaled by that share; Adam is insensitive
  to the scale);
- the random initialisation and the shuffling differ from a lone fit with the same seed.

Each head is then saved as its own standalone model (rebuilt with ``build_model`` and given the
trained weights) into exactly the folder and with the same files and ``config.json`` fields as
``fit_head``; ``config.json`` ``training.grid`` records the grid fit it came from. Scoring
(``record_head``, baselines) is :mod:`featlab.workflow`'s job, not this module's.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from .errors import FeatlabError
from .featureio import fusion_parts, row_bytes
from .keras_env import keras as _keras
from .labels import encode_target, split_rows, target_name
from .model import build_model
from .store import FeatureStore
STEPS_PER_EXECUTION = 16  # batches per call of the traced train step: less Python per batch, same batches

from .train import (_setup_tf, check_hyperparameters, fit_head, loss_and_metrics, make_optimizer, plan_head,
                    save_head)


def grid_heads(layers, targets) -> list[tuple[str, str, int | None]]:
    """(layer, target, cats) for every layer x target, layer-major, duplicates dropped."""
    out = []
    for layer in layers:
        for target, cats in targets:
            h = (str(layer), target, None if target != "bins" else int(cats))
            if h not in out:
                out.append(h)
    return out


def fit_grid(features, layers, targets, *, out_root=None, fold=None, seed_dir: bool = False, **hp) -> list[Path]:
    """Train every (tap, target) head of ``layers`` x ``targets`` (a list of ``(target, cats)``) in one
    process; returns the heads' folders, layer-major. ``hp``: :func:`featlab.train.fit_head`'s keyword
    hyperparameters, the same for every head."""
    layers = [str(x) for x in (layers or [])]
    if not layers:
        raise FeatlabError("the grid needs at least one --layer")
    if not targets:
        raise FeatlabError("the grid needs at least one target (--cats, --regression or --target)")
    if fold == "all":
        raise FeatlabError("fit_grid trains one fold; featlab.workflow.train_grid runs --fold all")
    fold = None if fold is None else int(fold)
    for layer in layers:
        fusion_parts(layer)  # a malformed fusion key fails before any work
    heads = grid_heads(layers, targets)
    # --ordinal is for the bin heads of a grid (it is refused for age or gender alone)
    hps = [check_hyperparameters(t, c, {**hp, "seed_dir": seed_dir, "ordinal": bool(hp.get("ordinal")) and t == "bins"})
           for _, t, c in heads]
    for t, c in {(t, c) for _, t, c in heads}:
        target_name(t, c)
    base = hps[0]
    verbose = base["verbose"]
    out: dict[int, Path] = {}
    with FeatureStore.open_read(features) as store:
        store.check_labels_current()
        labels = store.labels()
        for layer in layers:
            for p in fusion_parts(layer):
                store.array(p)  # a missing tap fails before any training
        rows = {}
        for t, c in {(t, c) for _, t, c in heads}:
            _, valid = encode_target(labels, t, c)
            if valid.any():
                sp = split_rows(labels, valid, fold, base["val_share"])
                rows[(t, c)] = (sp["train"], sp["val"])
        tr_all = np.unique(np.concatenate([r[0] for r in rows.values()])) if rows else np.empty(0, np.int64)
        va_all = np.unique(np.concatenate([r[1] for r in rows.values()])) if rows else np.empty(0, np.int64)
        need_rows = len(tr_all) + len(va_all)
        budget = base["memory_mb"] * (1 << 20)
        groups: list[list[int]] = []
        alone: list[int] = []
        cur: list[int] = []
        cur_parts: set[str] = set()
        for i, (layer, t, c) in enumerate(heads):
            parts = set(fusion_parts(layer))
            if need_rows * row_bytes(store, layer) > budget:
                alone.append(i)
                continue
            new = cur_parts | parts
            if cur and need_rows * sum(row_bytes(store, p) for p in new) > budget:
                groups.append(cur)
                cur, new = [], set(parts)
            cur.append(i)
            cur_parts = new
        if cur:
            groups.append(cur)
        for g in groups:
            dirs = _fit_group(store, [heads[i] for i in g], [hps[i] for i in g], out_root, fold, tr_all, va_all,
                              len(groups))
            out.update(zip(g, dirs))
    for i in alone:
        layer, t, c = heads[i]
        if verbose:
            print(f"[grid] {layer} -> {target_name(t, c)}: its rows do not fit {base['memory_mb']:g} MiB with the "
                  "others; trained alone (streamed)")
        out[i] = fit_head(features, layer, t, c, out_root=out_root, fold=fold, **hps[i])
    return [out[i] for i in range(len(heads))]


def _fit_group(store: FeatureStore, heads, hps, out_root, fold, tr_all, va_all, n_groups: int) -> list[Path]:
    t_start = time.perf_counter()
    base = hps[0]
    keras, _ = _setup_tf(base["seed"])
    parts = list(dict.fromkeys(p for layer, _, _ in heads for p in fusion_parts(layer)))
    cache_rows = np.union1d(tr_all, va_all)
    t_read = time.perf_counter()
    cache = {p: store.read(p, cache_rows) for p in parts}  # ONE read of each tap for every head of the group
    read_seconds = time.perf_counter() - t_read

    def read(p, rows):
        rows = np.asarray(rows, dtype=np.int64)
        if p in cache:
            pos = np.searchsorted(cache_rows, rows)
            if len(rows) == 0 or (pos < len(cache_rows)).all() and (cache_rows[np.minimum(pos, len(cache_rows) - 1)] == rows).all():
                return cache[p][pos]
        return store.read(p, rows)

    plans = []
    for (layer, t, c), hp in zip(heads, hps):
        plan = plan_head(store, layer, t, c, out_root, fold, hp, read=read)
        plan.pop("x_tr", None)  # the grid feeds the cache; no per-head copy of the train rows is kept
        plan["n_inputs"] = int(sum(np.prod(store.array(p).shape[1:]) for p in plan["parts"]))
        plans.append(plan)
    subs, losses, metrics = [], [], []
    for i, (plan, hp) in enumerate(zip(plans, hps)):
        subs.append(build_model(plan["tap_shape"], plan["n_classes"], plan["kind"], plan["mean"], plan["std"],
                                hp["hidden"], hp["dropout"], plan["pool"], plan["input_dropout"], hp["weight_decay"],
                                plan["age_grid"], name=f"head{i}"))
        loss, mets = loss_and_metrics(plan, hp)
        losses.append(loss)
        metrics.append(mets[0])
    rows = np.unique(np.concatenate([p["tr"] for p in plans]))
    x_fit = {p: read(p, rows) for p in parts}
    y_fit, w_fit = [], []
    for plan in plans:
        pos = np.searchsorted(rows, plan["tr"])
        y = np.zeros((len(rows), *plan["y_tr"].shape[1:]), dtype=np.float32)
        y[pos] = plan["y_tr"]
        w = np.zeros(len(rows), dtype=np.float32)
        w[pos] = plan["w_tr"] if plan["w_tr"] is not None else 1.0
        y_fit.append(y)
        w_fit.append(w)
    val_rows = np.unique(np.concatenate([p["va"] for p in plans]))
    x_val = {p: read(p, val_rows) for p in parts}
    stopper = grid_stopping(subs, plans, hps, losses, metrics, x_val, val_rows, base["lr"], base["patience"],
                            base["verbose"])
    optimizer = make_optimizer(base)  # one optimizer for the whole fit: Adam's moments are per parameter
    t_fit = time.perf_counter()
    fits = 0
    while True:
        # the joint model of the heads still training: one input per tap they read, one output per head.
        # Once stopped heads hold a quarter of the inputs, the fit restarts without them (same optimizer and
        # moments); every head's weights are set back to its best epoch at the end.
        run = [i for i in range(len(plans)) if not stopper.stopped[i]]
        used = list(dict.fromkeys(p for i in run for p in plans[i]["parts"]))
        inputs = {p: keras.Input(shape=tuple(int(d) for d in x_fit[p].shape[1:]), name=f"in{parts.index(p)}")
                  for p in used}
        outputs = [subs[i]([inputs[p] for p in plans[i]["parts"]] if plans[i]["fused"] else inputs[plans[i]["parts"][0]])
                   for i in run]
        joint = keras.Model([inputs[p] for p in used], outputs, name="featlab_grid")
        joint.compile(optimizer=optimizer, loss=[losses[i] for i in run], steps_per_execution=STEPS_PER_EXECUTION)
        stopper.running = run
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            joint.fit(x=[x_fit[p] for p in used], y=[y_fit[i] for i in run], sample_weight=[w_fit[i] for i in run],
                      batch_size=base["batch_size"], epochs=base["epochs"], initial_epoch=stopper.epoch + 1,
                      shuffle=True, callbacks=[stopper], verbose=2 if base["verbose"] and base["verbose"] > 1 else 0)
        fits += 1
        if all(stopper.stopped) or stopper.epoch + 1 >= base["epochs"]:
            stopper.stop_all()
            break
    fit_seconds = time.perf_counter() - t_fit
    stopper.restore()
    dirs = []
    grid_info = {"heads": len(plans), "groups": n_groups, "taps_read_once": parts, "rows_read": int(len(cache_rows)),
                 "read_seconds": round(read_seconds, 2), "fit_seconds_all_heads": round(fit_seconds, 2),
                 "epochs_run_all_heads": stopper.epoch + 1, "keras_fits": fits,
                 "learning_rate": "one ReduceLROnPlateau for the grid: halved when no running head improved "
                                  f"for {max(2, base['patience'] // 3)} epochs"}
    for i, (plan, hp, sub) in enumerate(zip(plans, hps, subs)):
        alone = build_model(plan["tap_shape"], plan["n_classes"], plan["kind"], plan["mean"], plan["std"],
                            hp["hidden"], hp["dropout"], plan["pool"], plan["input_dropout"], hp["weight_decay"],
                            plan["age_grid"])
        alone.set_weights(sub.get_weights())
        h = stopper.history[i]
        dirs.append(save_head(plan, store, alone, h, stopper.lrs[i], fit_seconds / len(plans), t_start, hp,
                              training={"grid": {**grid_info, "index": i}}))
    if base["verbose"]:
        print(f"[grid] {len(plans)} heads on {', '.join(parts)} in one fit: {stopper.epoch + 1} epochs, "
              f"{time.perf_counter() - t_start:.1f} s")
    return dirs


def grid_stopping(*args):
    """The grid's per-head early stopping as a :class:`keras.callbacks.Callback` (see the module doc;
    the class is made here so that this module imports without TensorFlow)."""
    cls = type("GridStopping", (_GridStoppingImpl, _keras().callbacks.Callback), {})
    cb = cls()
    cb._setup(*args)
    return cb


class _GridStoppingImpl:
    """Per head: val loss and metric on its own val rows, best weights, patience; one shared learning rate."""

    def _setup(self, subs, plans, hps, losses, metrics, x_val, val_rows, lr, patience, verbose):
        self.subs, self.plans, self.hps, self.losses, self.metrics = subs, plans, hps, losses, metrics
        self.x_val, self.val_rows = x_val, val_rows
        self.lr, self.min_lr = float(lr), float(lr) / 64
        self.lr_patience = max(2, int(patience) // 3)
        self.verbose = verbose
        n = len(subs)
        self.history = [{} for _ in range(n)]
        self.lrs = [[] for _ in range(n)]
        self.best = [None] * n
        self.best_weights = [None] * n
        self.wait = [0] * n
        self.stopped = [False] * n
        self.lr_best = [None] * n
        self.lr_wait = 0
        self.epoch = -1
        self.running = list(range(n))

    def _val_output(self, i):
        plan = self.plans[i]
        xs = [self.x_val[p] for p in plan["parts"]]
        outs = []
        for j in range(0, len(self.val_rows), 4096):
            xb = [x[j : j + 4096] for x in xs]
            outs.append(np.asarray(self.subs[i](xb if plan["fused"] else xb[0], training=False)))
        return np.concatenate(outs)

    def on_epoch_end(self, epoch, logs=None):
        keras = _keras()
        logs = logs or {}
        self.epoch = epoch
        lr_now = float(np.asarray(self.model.optimizer.learning_rate))
        improved_any = False
        for i, plan in enumerate(self.plans):
            if self.stopped[i]:
                continue
            pos = np.searchsorted(self.val_rows, plan["va"])
            y, p = plan["y_va"], self._val_output(i)[pos]
            yt, pt = keras.ops.convert_to_tensor(y), keras.ops.convert_to_tensor(p)
            vl = float(np.mean(np.asarray(self.losses[i](yt, pt))))
            reg = self.subs[i].losses
            if reg:
                vl += float(sum(np.asarray(r) for r in reg))
            met = self.metrics[i]
            if hasattr(met, "update_state"):
                met.reset_state()
                met.update_state(yt, pt)
                vm = float(np.asarray(met.result()))
            else:
                vm = float(np.mean(np.asarray(met(yt, pt))))
            h = self.history[i]
            tl = _train_loss(logs, i, self.running)
            h.setdefault("loss", []).append(tl)
            h.setdefault("val_loss", []).append(vl)
            h.setdefault("val_" + plan["metric_name"], []).append(vm)
            self.lrs[i].append(lr_now)
            cur = h[plan["mon_key"]][-1]
            better = (self.best[i] is None or (cur > self.best[i] if plan["mon_mode"] == "max" else cur < self.best[i]))
            self.wait[i] += 1
            if better:
                self.best[i] = cur
                self.best_weights[i] = self.subs[i].get_weights()
                self.wait[i] = 0
            if self.wait[i] >= self.hps[i]["patience"] and epoch > 0:
                self.stopped[i] = True
            # the shared learning rate: ReduceLROnPlateau's min_delta 1e-4 on each running head's own figure
            lb = self.lr_best[i]
            if lb is None or (cur > lb + 1e-4 if plan["mon_mode"] == "max" else cur < lb - 1e-4):
                self.lr_best[i] = cur
                improved_any = True
        if all(self.stopped):
            self.model.stop_training = True
            return
        # the fit goes on without the heads that stopped (see _fit_group) once they hold a quarter of the
        # running heads' inputs: a restart costs a new trace of the train step (about a second)
        width = {i: self.plans[i]["n_inputs"] for i in self.running}
        if sum(w for i, w in width.items() if self.stopped[i]) >= 0.25 * sum(width.values()):
            self.model.stop_training = True
        self.lr_wait = 0 if improved_any else self.lr_wait + 1
        if self.lr_wait >= self.lr_patience and lr_now > self.min_lr:
            self.model.optimizer.learning_rate.assign(max(lr_now * 0.5, self.min_lr))
            self.lr_wait = 0

    def stop_all(self) -> None:
        """The fit is over (every head stopped, or ``epochs`` reached)."""
        self.stopped = [True] * len(self.stopped)

    def restore(self) -> None:
        """Every head back to its best epoch's weights."""
        for sub, w in zip(self.subs, self.best_weights):
            if w is not None:
                sub.set_weights(w)


def _train_loss(logs: dict, i: int, running: list[int]) -> float:
    """Head ``i``'s train loss from a joint fit's logs (Keras names each output's loss after its sub-model)."""
    for k in (f"head{i}_loss", f"output_{running.index(i)}_loss"):
        if k in logs:
            return float(logs[k])
    return float(logs.get("loss", np.nan)) if len(running) == 1 else float("nan")
