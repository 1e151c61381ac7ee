"""A grid of heads trained in one pass: every (tap, target) head side by side in one Keras model.

:func:`fit_grid` trains the heads of ``layers x targets`` in one process. The taps are read once (the
train and val rows of every target together, as float32) when they fit the memory budget; otherwise
the heads are split into groups of taps that fit, one fit per group. The heads of a tap whose rows
alone do not fit are streamed together: every epoch reads the tap's train and val rows once for all of
them (blocks of a fresh permutation, the next block read in a thread; the same batches, so the same
figures, as in memory). A fusion head that does not fit is handed to :func:`featlab.heads.train.fit_head`.

Within a group, one Keras graph (:class:`GridNet`) holds every head, each built from the same pieces
as :func:`featlab.heads.model.build_model` for its tap (or taps, for a fusion key ``a+b``) and target, with its
own layers, output and loss. Heads that read the same input the same way (:func:`trunk_signature`:
taps, pooling, standardisation, input dropout) share a *trunk*: that input is standardised and
dropped out once per batch, and their first hidden layers run as one wide Dense layer, each head
owning its slice of the columns. The training rows are the union of the heads' train rows; a row
outside a head's train rows (no such label, or another split) has sample weight 0 for that head's
output, so each head learns from exactly its own rows. One epoch is one traced TensorFlow loop over
the batches (:func:`_epoch_loop`: no Keras ``fit`` machinery per batch). After each epoch every head is
scored on its own val rows (its val loss, and accuracy or MAE in years) and stopped as
:class:`keras.callbacks.EarlyStopping` would alone (:class:`HeadStopping`): once its patience runs out
its best weights are kept, its loss weight becomes 0 and its history ends; the fit ends when every
head has stopped or at ``epochs``. A trunk whose heads have all stopped is skipped from the next epoch
on (a ``tf.cond`` per trunk inside the traced loop: no forward or backward pass), so a group traces its
epoch loop once and its val predictor once, whatever stops and whatever the size of the last batch or
val chunk (``config.json`` ``training.grid.traces``). Skipping a trunk changes no other head's numbers:
each Dropout has its own seed state, trunks share no weights, and each trunk has its own optimizer,
stepped with every batch while it is live (so its step count is the grid's; one learning rate).

Differences from training each head alone (why the figures are close, not identical):

- one optimizer in effect (one per trunk, stepped together): Adam (and AdamW) keeps per-parameter
  moments, so the heads' updates do not mix, but there is ONE learning rate.
  Alone, each head halves its rate after its own plateau
  (ReduceLROnPlateau); here the rate is halved when none of the heads still training has improved
  for ``max(2, patience // 3)`` epochs, so a head may run at a higher rate than alone;
- the batches are drawn from the union of the heads' train rows, so a head sees fewer of its own rows
  per batch when the targets' rows differ (its loss is the mean over its own rows of the batch, as
  alone, so a smaller batch of its own rather than a down-weighted one);
- each head's columns of a trunk's first layer are drawn Glorot-uniform over (inputs, its own width),
  as alone, but from featlab's seeded generator, not Keras';
- heads of one trunk share the input dropout mask of each row: each head still sees a fresh mask on
  every row of every batch, the distribution it sees alone; their noise is correlated, their weights
  are not;
- the random initialisation and the shuffling differ from a lone fit with the same seed.

With ``seeds=[...]`` the grid is trained once per seed in the same pass: each group's taps are read (and
their statistics and finiteness checks computed) once, then each seed fits exactly as a grid of that seed
alone would (the seeds' ensembles are :mod:`featlab.study.workflow`'s).

Each head is then saved as its own standalone model (rebuilt with ``build_model`` and given the
trained weights) into exactly the folder and with the same files and ``config.json`` fields as
``fit_head``; ``config.json`` ``training.grid`` records the grid fit it came from. Scoring
(``record_head``, baselines) is :mod:`featlab.study.workflow`'s job, not this module's.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import FeatlabError
from ..features.featureio import fusion_parts, row_bytes
from .keras_env import keras as _keras
from ..data.labels import check_ranges, encode_target, split_rows, target_name
from .model import build_model, head_layers, standardised_input
from ..progress import Bar
from ..staging import checkpoint
from ..features.store import FeatureStore
from .train import (_setup_tf, check_hyperparameters, fit_head, input_stats, loss_and_metrics, make_optimizer,
                    plan_head, probe_config, save_head)


def grid_heads(layers, targets) -> list[tuple[str, str, int | None]]:
    """(layer, target, cats) for every layer x target, layer-major, duplicates dropped."""
    out = []
    for layer in layers:
        for target, cats in targets:
            h = (str(layer), target, None if target != "bins" else int(cats))
            if h not in out:
                out.append(h)
    return out


def fit_grid(features, layers, targets, *, out_root=None, fold=None, seed_dir: bool = False, trained=None,
             seeds=None, **hp) -> list:
    """Train every (tap, target) head of ``layers`` x ``targets`` (a list of ``(target, cats)``) in one
    process; returns the heads' folders, layer-major. ``hp``: :func:`featlab.heads.train.fit_head`'s keyword
    hyperparameters, the same for every head. ``trained(i, store, probe_config, stats)``: called for each
    head trained in a group once the group has trained, before its heads are saved, with what the head's
    baselines need (:func:`featlab.heads.train.probe_config`, :func:`featlab.heads.train.input_stats`): a grid starts
    its probes while this thread saves the heads.

    ``seeds`` (a list): train the grid once per seed in the same pass, and return one list of folders per
    seed. Each group's taps are read once for all the seeds (and their statistics and finiteness checks
    computed once); each seed's fit is exactly the fit of a grid of that seed alone (``seed=S``: the same
    initial weights, batches, dropout and early stopping, so the same bytes). ``trained`` is called for the
    first seed's heads only (the baselines do not depend on the seed)."""
    one = seeds is None
    seed_list = [int(hp.get("seed", 0))] if one else [int(x) for x in seeds]
    if not seed_list:
        raise FeatlabError("the grid needs at least one seed")
    layers = [str(x) for x in (layers or [])]
    if not layers:
        raise FeatlabError("the grid needs at least one --layer")
    if not targets:
        raise FeatlabError("the grid needs at least one target (--cats, --regression or --target)")
    if fold == "all":
        raise FeatlabError("fit_grid trains one fold; featlab.study.workflow.train_grid runs --fold all")
    fold = None if fold is None else int(fold)
    for layer in layers:
        fusion_parts(layer)  # a malformed fusion key fails before any work
    heads = grid_heads(layers, targets)
    # --ordinal is for the bin heads of a grid (it is refused for age or gender alone)
    hps_by_seed = [[check_hyperparameters(t, c, {**hp, "seed": s, "seed_dir": seed_dir,
                                                 "ordinal": bool(hp.get("ordinal")) and t == "bins"})
                    for _, t, c in heads] for s in seed_list]
    hps = hps_by_seed[0]
    for t, c in {(t, c) for _, t, c in heads}:
        target_name(t, c)
    base = hps[0]
    verbose = base["verbose"]
    out: list[dict[int, Path]] = [{} for _ in seed_list]

    def put(g, per_seed):
        for k, dirs in enumerate(per_seed):
            out[k].update(zip(g, dirs))

    with FeatureStore.reading(features) as store:
        store.check_labels_current()
        labels = store.labels()
        for layer in layers:
            for p in fusion_parts(layer):
                store.array(p)  # a missing tap fails before any training
        rows = {}
        for t, c in {(t, c) for _, t, c in heads}:
            check_ranges(labels, t, c, base["ranges"])  # a head that would lose range labels stops before TensorFlow
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
        streamed: dict[str, list[int]] = {}  # tap -> its heads, streamed together: one read of the tap per epoch
        cur: list[int] = []
        cur_parts: set[str] = set()
        for i, (layer, t, c) in enumerate(heads):
            parts = set(fusion_parts(layer))
            if need_rows * row_bytes(store, layer) > budget:
                (alone.append(i) if len(parts) > 1 else streamed.setdefault(layer, []).append(i))
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
            put(g, _fit_group(store, [heads[i] for i in g], [[h[i] for i in g] for h in hps_by_seed], out_root, fold,
                              tr_all, va_all, len(groups), trained=_at(trained, g)))
        for layer, g in streamed.items():
            if verbose:
                print(f"[grid] {layer}: its rows do not fit {base['memory_mb']:g} MiB; its {len(g)} heads are streamed "
                      "together (one read of the tap per epoch)")
            put(g, _fit_group(store, [heads[i] for i in g], [[h[i] for i in g] for h in hps_by_seed], out_root, fold,
                              tr_all, va_all, len(groups) + len(streamed), stream=True, trained=_at(trained, g)))
    for i in alone:
        layer, t, c = heads[i]
        if verbose:
            print(f"[grid] {layer} -> {target_name(t, c)}: its rows do not fit {base['memory_mb']:g} MiB with the "
                  "others; trained alone (streamed)")
        for k, h in enumerate(hps_by_seed):
            out[k][i] = fit_head(features, layer, t, c, out_root=out_root, fold=fold, **h[i])  # a path or the open store
    per_seed = [[o[i] for i in range(len(heads))] for o in out]
    return per_seed[0] if one else per_seed


def _at(hook, index: list[int]):
    """``hook`` with a group's own head numbers mapped to the grid's."""
    return None if hook is None else (lambda j, *a: hook(index[j], *a))


def trunk_signature(plan: dict, hp: dict) -> tuple:
    """Heads with equal signatures read the same input the same way (taps, pooling, standardisation,
    input dropout) and start with a hidden layer of the same kind: the grid computes that input once and
    their first hidden layers as one wide layer (see :func:`_fit_group`)."""
    stats = b"".join(np.ascontiguousarray(a, dtype=np.float64).tobytes()
                     for a in ([*plan["mean"], *plan["std"]] if plan["fused"] else [plan["mean"], plan["std"]]))
    return (tuple(plan["parts"]), plan["pool"], float(plan["input_dropout"] or 0.0), float(hp["weight_decay"]),
            bool(hp["hidden"]), hashlib.sha256(stats).hexdigest())


def _fit_group(store: FeatureStore, heads, hps_by_seed, out_root, fold, tr_all, va_all, n_groups: int,
               stream: bool = False, trained=None) -> list[list[Path]]:
    """Fit one group of heads once per seed (``hps_by_seed``: the heads' hyperparameters for each seed);
    returns their folders per seed. In memory: each tap read once for every seed, then every epoch from
    memory. With ``stream`` (one tap whose rows do not fit the budget): every epoch reads the tap's fit rows
    once, in blocks of a fresh permutation (each block read sorted, the next one read in a thread while this
    one trains), and its val rows once, in file order, for all the heads together (:func:`_streamed_epoch`)."""
    shared: dict = {"memo": {}}  # the taps' rows, statistics and checks: read and computed by the first seed
    n = len(hps_by_seed)
    if n == 1:
        return [_fit_seed(store, heads, hps_by_seed[0], out_root, fold, tr_all, va_all, n_groups, stream, trained,
                          shared, None)]
    # ``trained`` gets the first seed's heads once the LAST seed has trained: the probes it starts would
    # otherwise run beside the later seeds' fits (TensorFlow ran 3x slower per epoch beside them on 2 cores)
    held: list = []
    out = [_fit_seed(store, heads, hps, out_root, fold, tr_all, va_all, n_groups, stream,
                     (lambda *a: held.append(a)) if trained is not None and k == 0 else None,
                     shared, {"seeds": [h[0]["seed"] for h in hps_by_seed], "this": k})
           for k, hps in enumerate(hps_by_seed)]
    for a in held:
        trained(*a)
    return out


def _fit_seed(store: FeatureStore, heads, hps, out_root, fold, tr_all, va_all, n_groups: int, stream: bool, trained,
              shared: dict, seed_pass: dict | None) -> list[Path]:
    """One seed's fit of a group (:func:`_fit_group`); ``shared`` carries the group's rows in memory (and the
    statistics' memo) from the first seed to the next."""
    t_start = time.perf_counter()
    base = hps[0]
    label = "" if seed_pass is None else f" (seed {base['seed']}, {seed_pass['this'] + 1} of {len(seed_pass['seeds'])})"
    # the epochs' bar starts before TensorFlow loads and the loop is traced (15-25 s on 2 cores): never silent
    parts = list(dict.fromkeys(p for layer, _, _ in heads for p in fusion_parts(layer)))
    with Bar(base["epochs"], f"train {len(heads)} head{'s' * (len(heads) > 1)} on {', '.join(parts)}{label}", "epoch",
             rate=False) as bar:
        bar.note("loading TensorFlow, reading the taps, tracing the loop")
        keras, tf = _setup_tf(base["seed"])
        cache_rows = np.union1d(tr_all, va_all)
        first = "read_seconds" not in shared
        if first:
            t_read = time.perf_counter()
            # ONE read of each tap for every head and seed of the group (streamed: none here, one per epoch)
            shared["cache"] = {} if stream else {p: store.read(p, cache_rows) for p in parts}
            shared["read_seconds"] = time.perf_counter() - t_read
        cache, read_seconds = shared["cache"], shared["read_seconds"]

        def read(p, rows):
            rows = np.asarray(rows, dtype=np.int64)
            if p in cache:
                pos = np.searchsorted(cache_rows, rows)
                if len(rows) == 0 or (pos < len(cache_rows)).all() and (cache_rows[np.minimum(pos, len(cache_rows) - 1)] == rows).all():
                    return cache[p][pos]
            return store.read(p, rows)

        plans, memo = [], shared["memo"]
        for (layer, t, c), hp in zip(heads, hps):
            # the grid feeds the cache: no per-head copy of the train rows
            plan = plan_head(store, layer, t, c, out_root, fold, hp, read=read, memo=memo, keep_x=False)
            plan["n_inputs"] = row_bytes(store, layer) // 4
            plans.append(plan)
        shapes = {p: tuple(int(d) for d in store.array(p).shape[1:]) for p in parts}
        net = GridNet(plans, hps, parts, shapes, seed=base["seed"])
        rows = np.unique(np.concatenate([p["tr"] for p in plans]))
        if first:
            pos_fit = np.searchsorted(cache_rows, rows)
            shared["x_fit"] = {} if stream else {p: tf.constant(cache[p][pos_fit]) for p in parts}
            shared["fit_rows"] = rows
        elif not np.array_equal(rows, shared["fit_rows"]):  # the split is the seed's business only through the data
            raise FeatlabError("internal: a grid's seeds have different training rows")
        x_fit = shared["x_fit"]
        y_fit, w_fit, m_fit = [], [], []
        for plan in plans:
            pos = np.searchsorted(rows, plan["tr"])
            y = np.zeros((len(rows), *plan["y_tr"].shape[1:]), dtype=np.float32)
            y[pos] = plan["y_tr"]
            w = np.zeros(len(rows), dtype=np.float32)
            w[pos] = plan["w_tr"] if plan["w_tr"] is not None else 1.0
            member = np.zeros(len(rows), dtype=np.float32)
            member[pos] = 1.0
            y_fit.append(tf.constant(y))
            w_fit.append(tf.constant(w))
            m_fit.append(tf.constant(member))
        val_rows = np.unique(np.concatenate([p["va"] for p in plans]))
        if first:
            shared["x_val"] = {} if stream else {p: tf.constant(cache[p][np.searchsorted(cache_rows, val_rows)])
                                                 for p in parts}
            cache.clear()  # the fit and val rows now live in x_fit and x_val, for every seed
        x_val = shared["x_val"]
        stopper = HeadStopping(plans, hps, net, val_rows, base["lr"], base["patience"])
        # one optimizer per trunk (trunks share no weights), stepped together: Adam's moments are per parameter
        # and every live trunk's step count is the grid's, so this is one optimizer over all weights, except
        # that a skipped trunk's weights are left alone. One learning rate: the first's, copied to the others
        optimizers = [make_optimizer(base) for _ in net.trunks]
        for o, k in zip(optimizers, range(len(net.trunks))):
            o.build(net.model_of([k])[1].trainable_variables)
        optimizer = optimizers[0]
        rng = np.random.default_rng(base["seed"])
        order = [i for t in net.trunks for i in t["heads"]]  # the heads in trunk order: the loop's outputs
        loop_args = (tf, net, [y_fit[i] for i in order], [w_fit[i] for i in order], [m_fit[i] for i in order])
        if stream:
            step = _block_loop(*loop_args, shapes, [stopper.loss_fns[i] for i in order], optimizers, base["batch_size"])
            block_rows = max(1, int(plans[0]["block_budget"]) // max(1, sum(row_bytes(store, p) for p in parts)))
            block_rows = max(base["batch_size"], block_rows // base["batch_size"] * base["batch_size"])
        else:
            step = _epoch_loop(*loop_args, x_fit, [stopper.loss_fns[i] for i in order], optimizers, base["batch_size"])
        predict = _predictor(tf, net, shapes)
        epoch_reads = []
        t_fit, c_fit = time.perf_counter(), time.process_time()
        epoch = 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
            while epoch < base["epochs"] and not all(stopper.stopped):
                # a trunk whose heads have all stopped is skipped (tf.cond in the traced loop), not traced again
                live = tf.constant(_live_trunks(net, stopper.stopped), dtype=tf.float32)
                active = tf.constant([0.0 if stopper.stopped[i] else 1.0 for i in order], dtype=tf.float32)
                if stream:
                    t_r = time.perf_counter()
                    losses, read_s = _streamed_epoch(store, parts, rows, rng.permutation(len(rows)), block_rows, step,
                                                     active, live, tf)
                    train_losses = dict(zip(order, losses))
                    chunks = [_as_list(predict([store.read(p, val_rows[j: j + VAL_CHUNK]) for p in parts], live))
                              for j in range(0, max(len(val_rows), 1), VAL_CHUNK)]
                    epoch_reads.append({"seconds": round(time.perf_counter() - t_r, 2), "read_wait_seconds": round(read_s, 2)})
                else:
                    perm = tf.constant(rng.permutation(len(rows)), dtype=tf.int32)
                    train_losses = dict(zip(order, np.asarray(step(perm, active, live)).tolist()))
                    chunks = [_as_list(predict([x_val[p][j: j + VAL_CHUNK] for p in parts], live))
                              for j in range(0, max(len(val_rows), 1), VAL_CHUNK)]  # bounded activations on a large val split
                outs = [np.concatenate([np.asarray(c[h]) for c in chunks]) for h in range(len(order))]
                stopper.end_epoch(epoch, float(np.asarray(optimizer.learning_rate)), train_losses, dict(zip(order, outs)),
                                  optimizer)
                for o in optimizers[1:]:
                    o.learning_rate.assign(optimizer.learning_rate)
                epoch += 1
                running = len(plans) - sum(bool(x) for x in stopper.stopped)
                bar.note(f"{running} of {len(plans)} still training (early stopping on val), "
                         f"{(time.perf_counter() - t_fit) / epoch:.1f} s/epoch")
                bar(1)
                checkpoint("grid-epoch")
    traces = {"epoch_loop": int(step.experimental_get_tracing_count()),
              "predict": int(predict.experimental_get_tracing_count())}
    fit_seconds = time.perf_counter() - t_fit
    fit_cpu = time.process_time() - c_fit  # every thread of this process: comparable with a CNN's cpu_seconds
    if trained is not None:  # before the heads are saved (their models, their history plots)
        for j, (plan, hp) in enumerate(zip(plans, hps)):
            trained(j, store, probe_config(plan, hp), input_stats(plan))
    dirs = []
    grid_info = {"heads": len(plans), "groups": n_groups, "taps_read_once": parts, "rows_read": int(len(cache_rows)),
                 "read_seconds": round(read_seconds, 2),
                 **({} if seed_pass is None else {"seed_pass": {
                     **seed_pass, "note": "the seeds of one pass share one read of each tap (by the first seed)"}}), "fit_seconds_all_heads": round(fit_seconds, 2),
                 "fit_cpu_seconds_all_heads": round(fit_cpu, 1),
                 "epochs_run_all_heads": epoch, "traces": traces,
                 **({"streamed": {"block_rows": int(block_rows), "epochs": epoch_reads}} if stream else {}),
                 "shared_input": [[f"{plans[i]['key']} -> {plans[i]['tname']}" for i in t["heads"]] for t in net.trunks],
                 "learning_rate": "one ReduceLROnPlateau for the grid: halved when no running head improved "
                                  f"for {max(2, base['patience'] // 3)} epochs"}
    with Bar(len(plans), "save the heads (weights, history plots)", "head", rate=False) as saved:
        for i, (plan, hp) in enumerate(zip(plans, hps)):
            alone = build_model(plan["tap_shape"], plan["n_classes"], plan["kind"], plan["mean"], plan["std"],
                                hp["hidden"], hp["dropout"], plan["pool"], plan["input_dropout"], hp["weight_decay"],
                                plan["age_grid"])
            for name, ws in stopper.best_weights[i].items():
                alone.get_layer(name).set_weights(ws)
            dirs.append(save_head(plan, store, alone, stopper.history[i], stopper.lrs[i], fit_seconds / len(plans),
                                  t_start, hp, training={"grid": {**grid_info, "index": i}}))
            saved(1)
    if base["verbose"]:
        print(f"[grid] {len(plans)} heads on {', '.join(parts)} in one fit: {epoch} epochs, "
              f"{time.perf_counter() - t_start:.1f} s")
    return dirs


VAL_CHUNK = 4096  # val rows per inference call of the grid


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _live_trunks(net: "GridNet", stopped: list[bool]) -> list[float]:
    """1.0 for each trunk with a head still training, 0.0 for a trunk whose heads have all stopped."""
    return [0.0 if all(stopped[i] for i in t["heads"]) else 1.0 for t in net.trunks]


def _epoch_loop(tf, net: "GridNet", ys, ws, members, xs: dict, loss_fns, optimizers, batch_size: int):
    """One epoch as one traced TensorFlow function: every batch of a permutation of the fit rows, one
    optimizer step for all heads. ``ys``, ``ws``, ``members``, ``loss_fns``: per head in trunk order (the
    trunks' heads one after another); ``xs``: the fit rows of each tap; ``optimizers``: one per trunk. A
    head's loss on a batch is its weighted loss over ITS rows of the batch (``members``), as if the batch
    held only them (Keras' mean over the batch, alone); ``active``: 0 for heads that have stopped;
    ``live``: 0 for trunks whose heads have all stopped, which are skipped (a ``tf.cond`` per trunk and
    batch: no forward pass, no gradient, no optimizer step). The trunks share no weights, so each trunk's
    gradient is that of the sum of all heads' losses. Returns each head's train loss over the epoch, the
    mean over its batches weighted by its rows in each (as Keras logs it, without the weight penalty).

    Traced once per grid group: every argument has a fixed signature (the batches, the last partial one
    included, are slices inside the loop) and the data are captured, so no stop traces it again."""
    b = int(batch_size)
    batch, n_trunks = _trunk_steps(tf, net, ys, ws, members, loss_fns, optimizers)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([len(ys)], tf.float32),
                                  tf.TensorSpec([n_trunks], tf.float32)])
    def step(perm, active, live):
        n = tf.shape(perm)[0]
        steps = (n + b - 1) // b
        sums = tf.zeros_like(active)
        counts = tf.zeros_like(active)
        for s in tf.range(steps):
            idx = perm[s * b: tf.minimum((s + 1) * b, n)]
            xb = {p: tf.gather(x, idx) for p, x in xs.items()}
            ls, cnt = batch(xb, idx, active, live)
            sums = sums + ls * cnt
            counts = counts + cnt
        return sums / tf.maximum(counts, 1.0)

    return step


def _trunk_steps(tf, net: "GridNet", ys, ws, members, loss_fns, optimizers):
    """(batch, number of trunks): ``batch(xb, idx, active, live)`` steps every live trunk on one batch
    (``xb``: the batch's rows of each tap; ``idx``: their positions in the fit rows) and returns every head's
    loss on it and its rows in it (``members``), the loop's :func:`_epoch_loop` and :func:`_block_loop`
    share. Trunk ``k``'s ``tf.cond`` has two branches: a forward and backward pass with its optimizer's
    step, returning its heads' losses, or zeros when it is skipped."""
    subs = [net.model_of([k]) for k in range(len(net.trunks))]
    starts = np.cumsum([0] + [len(q[0]) for q in subs]).tolist()

    def trunk(k, xb, idx, size, cnt, active):
        run, model, used = subs[k]
        a, z = starts[k], starts[k + 1]
        variables = model.trainable_variables

        def on():
            with tf.GradientTape() as tape:
                outs = _as_list(model([xb[p] for p in used], training=True))
                ls = tf.stack([loss_fns[a + j](tf.gather(ys[a + j], idx), o, sample_weight=tf.gather(ws[a + j], idx))
                               for j, o in enumerate(outs)])
                ls = ls * size / tf.maximum(cnt[a:z], 1.0)  # Keras divides by the batch size; alone, that is cnt
                # a stopped head's NaN stays out
                total = tf.reduce_sum(tf.where(active[a:z] > 0, ls, tf.zeros_like(ls)))
                if model.losses:
                    total = total + tf.add_n(model.losses)
            grads = tape.gradient(total, variables)
            optimizers[k].apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
            return ls

        return on, lambda: tf.zeros([z - a])

    def batch(xb, idx, active, live):
        size = tf.cast(tf.size(idx), tf.float32)
        cnt = tf.stack([tf.reduce_sum(tf.gather(m, idx)) for m in members])
        ls = tf.concat([tf.cond(live[k] > 0, *trunk(k, xb, idx, size, cnt, active)) for k in range(len(subs))],
                       axis=0)
        return ls, cnt

    return batch, len(subs)


def _block_loop(tf, net: "GridNet", ys, ws, members, shapes: dict, loss_fns, optimizers, batch_size: int):
    """:func:`_epoch_loop` for a streamed group: one traced call per block of rows read from the file.
    ``xs``: the block's rows of each tap, in permutation order; ``pos``: their positions in the fit rows
    (for the targets, weights and memberships). Returns each head's summed loss (weighted by its rows) and
    its row count over the block; :func:`_streamed_epoch` adds the blocks up as :func:`_epoch_loop` does
    the batches. Traced once: a block of any size."""
    b = int(batch_size)
    parts = list(shapes)
    batch, n_trunks = _trunk_steps(tf, net, ys, ws, members, loss_fns, optimizers)

    @tf.function(input_signature=[[tf.TensorSpec([None, *[int(d) for d in shapes[p]]], tf.float32) for p in parts],
                                  tf.TensorSpec([None], tf.int32), tf.TensorSpec([len(ys)], tf.float32),
                                  tf.TensorSpec([n_trunks], tf.float32)])
    def step(xs, pos, active, live):
        n = tf.shape(pos)[0]
        steps = (n + b - 1) // b
        sums = tf.zeros_like(active)
        counts = tf.zeros_like(active)
        for s in tf.range(steps):
            lo, hi = s * b, tf.minimum((s + 1) * b, n)
            idx = pos[lo:hi]
            xb = {p: x[lo:hi] for p, x in zip(parts, xs)}
            ls, cnt = batch(xb, idx, active, live)
            sums = sums + ls * cnt
            counts = counts + cnt
        return sums, counts

    return step


def _streamed_epoch(store: FeatureStore, parts, rows, perm, block_rows: int, step, active, live, tf):
    """One streamed epoch: ``perm`` (positions in ``rows``) cut into blocks of ``block_rows`` (whole batches),
    each block's rows of every tap read from the file (sorted for the read, returned in permutation order)
    in a thread while the previous block trains. Returns (each head's mean train loss, seconds waited on reads)."""
    from concurrent.futures import ThreadPoolExecutor

    def load(a):
        pos = perm[a: a + block_rows]
        return [store.read(p, rows[pos]) for p in parts], pos

    starts = list(range(0, len(perm), block_rows))
    sums = counts = 0.0
    waited = 0.0
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, starts[0]) if starts else None
        for k in range(len(starts)):
            t = time.perf_counter()
            xs, pos = nxt.result()
            waited += time.perf_counter() - t
            nxt = pool.submit(load, starts[k + 1]) if k + 1 < len(starts) else None
            s, c = step([tf.convert_to_tensor(x) for x in xs], tf.constant(pos, dtype=tf.int32), active, live)
            del xs
            sums, counts = sums + np.asarray(s), counts + np.asarray(c)
    return (np.asarray(sums) / np.maximum(counts, 1.0)).tolist(), waited


def _predictor(tf, net: "GridNet", shapes: dict):
    """Every head's outputs (heads in trunk order) for a chunk of rows of each tap of ``shapes``, the
    trunks with ``live`` 0 skipped (zeros). Traced once: a chunk of any size, any trunks live."""
    subs = [net.model_of([k]) for k in range(len(net.trunks))]
    parts = list(shapes)

    @tf.function(input_signature=[[tf.TensorSpec([None, *[int(d) for d in shapes[p]]], tf.float32) for p in parts],
                                  tf.TensorSpec([len(subs)], tf.float32)])
    def predict(xs, live):
        x = dict(zip(parts, xs))
        n = tf.shape(xs[0])[0]
        out = []
        for k, (_, model, used) in enumerate(subs):
            zeros = [tf.zeros(tf.concat([[n], tf.constant([int(d) for d in o.shape[1:]], tf.int32)], 0))
                     for o in model.outputs]
            out += _as_list(tf.cond(live[k] > 0, lambda m=model, u=used: _as_list(m([x[p] for p in u], training=False)),
                                    lambda z=zeros: z))
        return out

    return predict


class GridNet:
    """Every head of a group in one Keras graph. Heads with the same :func:`trunk_signature` share a
    trunk: their taps' input is pooled, standardised and dropped out once, and their first hidden
    layers are one Dense layer as wide as all of them (a head owns its slice of its columns: its
    kernel columns, its biases). Dropout after it, further layers and the output are each head's own,
    built by :func:`featlab.heads.model.head_layers` with the names of a head trained alone, prefixed
    ``g{i}_``.

    Sharing the input dropout mask couples the heads' noise, not their weights: each head still sees a
    fresh Bernoulli mask on every row of every batch, exactly the distribution it sees alone."""

    def __init__(self, plans, hps, parts, shapes, seed: int = 0):
        keras = _keras()
        rng = np.random.default_rng(seed)
        self.plans, self.hps = plans, hps
        self.inputs = {p: keras.Input(shape=tuple(int(d) for d in shapes[p]), name=f"in{j}") for j, p in enumerate(parts)}
        sig: dict[tuple, list[int]] = {}
        for i, (plan, hp) in enumerate(zip(plans, hps)):
            sig.setdefault(trunk_signature(plan, hp), []).append(i)
        self.trunks, self.outputs, self.cols = [], {}, {}
        for k, members in enumerate(sig.values()):
            plan0, hp0 = plans[members[0]], hps[members[0]]
            ins = [self.inputs[p] for p in plan0["parts"]]
            x = standardised_input(ins, plan0["mean"] if plan0["fused"] else [plan0["mean"]],
                                   plan0["std"] if plan0["fused"] else [plan0["std"]], plan0["pool"], plan0["fused"],
                                   prefix=f"t{k}_")
            if plan0["input_dropout"]:
                x = keras.layers.Dropout(plan0["input_dropout"], name=f"t{k}_input_dropout")(x)
            dense = None
            if hp0["hidden"]:
                widths = [int(hps[i]["hidden"][0]) for i in members]
                wd = hp0["weight_decay"]
                dense = keras.layers.Dense(sum(widths), activation="relu", name=f"t{k}_hidden1",
                                           kernel_regularizer=keras.regularizers.L2(wd) if wd else None)
                h = dense(x)
                # each head's columns start as a lone head's first layer would: Glorot-uniform over
                # (inputs, its own width), not over the trunk's whole width
                fan_in = int(dense.kernel.shape[0])
                dense.kernel.assign(np.concatenate(
                    [rng.uniform(-1, 1, (fan_in, w)) * np.sqrt(6.0 / (fan_in + w)) for w in widths], axis=1
                ).astype(np.float32))
                a = 0
                for i, w in zip(members, widths):
                    self.cols[i] = (a, a + w)
                    xi = h[:, a: a + w]
                    if hps[i]["dropout"]:
                        xi = keras.layers.Dropout(hps[i]["dropout"], name=f"g{i}_dropout1")(xi)
                    self._head(i, xi, first=1)
                    a += w
            else:
                for i in members:
                    self._head(i, x, first=0)
            self.trunks.append({"heads": members, "dense": dense, "parts": plan0["parts"],
                                "width": int(plan0["n_inputs"]) * len(members)})
        self.trunk_of = {i: k for k, tr in enumerate(self.trunks) for i in tr["heads"]}
        _, self.full, _ = self.model_of(range(len(self.trunks)))
        self.own = {i: [layer for layer in self.full.layers if layer.name.startswith(f"g{i}_") and layer.weights]
                    for i in range(len(plans))}

    def _head(self, i: int, x, first: int) -> None:
        plan, hp = self.plans[i], self.hps[i]
        self.outputs[i] = head_layers(x, plan["n_classes"], plan["kind"], hp["hidden"], hp["dropout"],
                                      hp["weight_decay"], plan["age_grid"], prefix=f"g{i}_", first=first)

    def model_of(self, trunks):
        """(heads, model, taps) for the given trunks: a Keras model over the graph's own layers."""
        keras = _keras()
        run = [i for k in trunks for i in self.trunks[k]["heads"]]
        used = list(dict.fromkeys(p for k in trunks for p in self.trunks[k]["parts"]))
        model = keras.Model([self.inputs[p] for p in used], [self.outputs[i] for i in run], name="featlab_grid")
        return run, model, used

    def head_weights(self, i: int) -> dict[str, list[np.ndarray]]:
        """Head ``i``'s trained weights by the layer names of the head built alone (copies)."""
        out = {}
        dense = self.trunks[self.trunk_of[i]]["dense"]
        if dense is not None:
            a, b = self.cols[i]
            kern, bias = dense.get_weights()
            out["hidden1"] = [kern[:, a:b].copy(), bias[a:b].copy()]
        for layer in self.own[i]:
            out[layer.name[len(f"g{i}_"):]] = [w.copy() for w in layer.get_weights()]
        return out


class HeadStopping:
    """Per head, as :class:`keras.callbacks.EarlyStopping` and ``ReduceLROnPlateau`` would do alone: val
    loss and metric on its own val rows, best weights, patience; one shared learning rate (halved when
    no running head improved for ``max(2, patience // 3)`` epochs)."""

    def __init__(self, plans, hps, net: GridNet, val_rows, lr, patience):
        keras = _keras()
        self.plans, self.hps, self.net, self.val_rows = plans, hps, net, val_rows
        self.loss_fns, self.metrics = [], []
        for plan, hp in zip(plans, hps):
            loss, mets = loss_and_metrics(plan, hp)
            self.loss_fns.append(loss if isinstance(loss, keras.losses.Loss) else _per_sample_loss(loss))
            self.metrics.append(mets[0])
        self.min_lr = float(lr) / 64
        self.lr_patience = max(2, int(patience) // 3)
        n = len(plans)
        self.history = [{} for _ in range(n)]
        self.lrs = [[] for _ in range(n)]
        self.best = [None] * n
        self.best_weights = [None] * n
        self.wait = [0] * n
        self.stopped = [False] * n
        self.lr_best = [None] * n
        self.lr_wait = 0

    def end_epoch(self, epoch: int, lr_now: float, train_losses: dict, outputs: dict, optimizer) -> None:
        keras = _keras()
        improved_any = False
        for i, plan in enumerate(self.plans):
            if self.stopped[i]:
                continue
            pos = np.searchsorted(self.val_rows, plan["va"])
            yt = keras.ops.convert_to_tensor(plan["y_va"])
            pt = keras.ops.convert_to_tensor(outputs[i][pos])
            vl = float(np.mean(np.asarray(self.loss_fns[i](yt, pt))))
            wd = self.hps[i]["weight_decay"]
            if wd:  # L2 on the kernels of the hidden layers and of a Dense output (not CORAL's), as Keras adds it
                vl += wd * sum(float(np.sum(np.square(ws[0]))) for name, ws in self.net.head_weights(i).items()
                               if name.startswith("hidden") or (name == "output" and plan["kind"] != "coral"))
            met = self.metrics[i]
            if hasattr(met, "update_state"):
                met.reset_state()
                met.update_state(yt, pt)
                vm = float(np.asarray(met.result()))
            else:
                vm = float(np.mean(np.asarray(met(yt, pt))))
            h = self.history[i]
            h.setdefault("loss", []).append(float(train_losses[i]))
            h.setdefault("val_loss", []).append(vl)
            h.setdefault("val_" + plan["metric_name"], []).append(vm)
            self.lrs[i].append(lr_now)
            cur = h[plan["mon_key"]][-1]
            better = (self.best[i] is None or (cur > self.best[i] if plan["mon_mode"] == "max" else cur < self.best[i]))
            self.wait[i] += 1
            if better:
                self.best[i] = cur
                self.best_weights[i] = self.net.head_weights(i)
                self.wait[i] = 0
            elif self.wait[i] >= self.hps[i]["patience"] and epoch > 0:
                self.stopped[i] = True
            # the shared learning rate: ReduceLROnPlateau's min_delta 1e-4 on each running head's own figure
            lb = self.lr_best[i]
            if lb is None or (cur > lb + 1e-4 if plan["mon_mode"] == "max" else cur < lb - 1e-4):
                self.lr_best[i] = cur
                improved_any = True
        self.lr_wait = 0 if improved_any else self.lr_wait + 1
        if self.lr_wait >= self.lr_patience and lr_now > self.min_lr:
            optimizer.learning_rate.assign(max(lr_now * 0.5, self.min_lr))
            self.lr_wait = 0


def _per_sample_loss(fn):
    """A plain ``fn(y_true, y_pred)`` as a Keras loss (sample weights, mean over the batch), as
    ``Model.compile`` wraps it."""
    keras = _keras()

    class PerSample(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return fn(y_true, y_pred)

    return PerSample(name=getattr(fn, "__name__", "loss"))
