"""Baselines next to every head, on the same faces: what a trivial and a linear reader score.

- ``majority``: the most frequent training class (bins, gender), or the median training age (age).
- ``linear``: a linear probe on the same tap, standardised exactly as the head's input (the head's own
  train-row mean/std, after the head's pooling), fitted on the train rows with its regularisation chosen
  on the validation rows: scikit-learn ``LogisticRegression`` (bins, gender; L-BFGS, each C warm-started
  from the nearest C fitted and continued until it converges, up to ``MAX_ITER_TOTAL`` iterations; C by
  val accuracy, ties by val log-loss) or ridge regression (age; solved exactly for each alpha by a
  Cholesky solve of the train Gram matrix, alpha by val MAE). The grid of C or alpha starts at ``C_GRID`` / ``ALPHA_GRID``
  and is extended a decade at a time while the choice sits on its edge (within ``C_BOUNDS`` /
  ``ALPHA_BOUNDS``). ``baselines.json`` records, under ``settings``: the values searched (``grid``,
  ``extended``, ``search`` with each value's val figure, and for C its iterations and convergence),
  ``chosen``, ``stopped`` (``inside``; ``flat``: the edge's val MAE moved by under ``FLAT_MAE`` of itself;
  ``bound``), ``at_edge`` (the choice sits on a bound), ``iterations`` and ``converged`` of the chosen
  fit; a probe that did not converge or chose a bound says so on stderr.

:func:`fit_baselines` writes ``baselines.json`` (per baseline: settings, ``val`` and ``test`` figures
with intervals) and ``baselines_faces.csv`` (image_id, split, baseline, per-face values) into the
head's folder. The zero-shot nets are in :mod:`featlab.heads.zeroshot`.

A grid's probes (``fit_baselines(..., shared=ProbeCache())``, what :func:`featlab.study.workflow.train_grid`
passes) fit the same models, searched and chosen the same way, but share their work: each tap is read and
standardised once for all its heads (when every row fits the budget), and per set of train rows one centred
Gram matrix in float64 serves every ridge alpha and the logistic probes' preconditioner (its eigenpairs:
all of them up to ``EIGH_FULL`` values per face, else the leading ``PRECOND_RANK`` by randomized subspace
iteration). Each C is solved by :func:`_fast_logistic` (scipy's L-BFGS in preconditioned coordinates,
warm-started from the nearest C) until scikit-learn's gradient test passes with a margin, then handed to
scikit-learn warm-started, whose own solver and convergence test have the last word (it normally confirms at
once, 0 iterations; ``iterations`` counts both). A tap wider than its train rows are many keeps the lone path's
solvers (dual ridge, scikit-learn's L-BFGS from scratch) on the shared read. ``settings.solver`` names the
logistic fast path.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

from ..scoring.scores import score_predictions
from ..features.featureio import read_blocks, read_pooled, row_bytes
from ..data.labels import encode_target, face_scores, selection_metric, split_rows
from ..staging import checkpoint
from ..features.store import FeatureStore

#: The first grids (decades); a choice on an edge of the searched grid extends it by a decade on that side,
#: again and again, until the choice is inside or the bound is reached (then ``at_edge`` is true).
C_GRID = (1e-3, 1e-2, 1e-1, 1.0)
C_BOUNDS = (1e-6, 1e3)
ALPHA_GRID = (1.0, 10.0, 100.0, 1000.0, 10000.0)
ALPHA_BOUNDS = (1e-6, 1e8)
#: The ridge search stops at an edge whose val MAE improves on its neighbour's by less than this share.
FLAT_MAE = 1e-3
#: L-BFGS iterations per fit; a fit that stops at the cap is continued (warm-started) up to MAX_ITER_TOTAL
#: iterations in all, and recorded as not converged (with a warning) if it still has not.
MAX_ITER = 500
MAX_ITER_TOTAL = 5000
TOL = 1e-4
#: BLAS threads while a probe fits (None: the library's default). L-BFGS spends much of its time in small BLAS
#: calls where threads contend: on 2 busy cores, 2 OpenBLAS threads made the demo's 12 probes 18-25x slower than
#: 1 (110-180 s vs 4.5-6 s). On an idle many-core machine the wide-tap probes of a large split would gain from more.
BLAS_THREADS = 1

#: Per thread, the event that cancels its probe (set by :class:`featlab.heads.probepool.ProbePool`'s workers).
_local = threading.local()


class Cancelled(Exception):
    """A probe stopped part-way because its pool was told to stop (an interrupted command)."""


def load_blas() -> None:
    """Import every library whose BLAS a probe calls (numpy's, and scipy's own copy that scipy.linalg,
    scipy.optimize and scikit-learn use) before a thread limit is set: threadpoolctl limits only the
    libraries loaded when it is called. (Without this, the first probe of a process ran scipy's BLAS on
    every core and later ones on one: results equal only to the last bits.)"""
    import scipy.linalg  # noqa: F401
    import scipy.optimize  # noqa: F401
    import sklearn.linear_model  # noqa: F401


def _check_cancel() -> None:
    ev = getattr(_local, "cancel", None)
    if ev is not None and ev.is_set():
        raise Cancelled


def _design(store: FeatureStore, key: str, rows, pool, mean, std, budget: int) -> np.ndarray:
    parts = []
    for r in read_blocks(rows, store, key, max(1 << 20, budget // 4)):
        x = read_pooled(store, key, r, pool)  # a fusion key: its taps concatenated
        parts.append(((x - mean) / std).astype(np.float32))
    return np.concatenate(parts) if parts else np.empty((0, len(mean)), np.float32)


def _proba_pred(target: str, raw, classes, n_classes: int) -> dict:
    if target == "age":
        return {"pred": np.clip(np.asarray(raw, dtype=np.float64).ravel(), 0.0, None)}
    proba = np.zeros((len(raw), n_classes))
    proba[:, classes] = raw
    return {"pred": proba.argmax(axis=1).astype(np.int64), "proba": proba}


def _decade(v: float, step: int) -> float:
    return float(10.0 ** (round(math.log10(v)) + step))


def _search(grid, bounds, evaluate, flat: float = 0.0) -> tuple[dict, float, list, str]:
    """Evaluate every value of ``grid`` (``evaluate(v)`` -> dict with a ``key`` tuple, larger is better;
    ties go to the smaller value); while the best lies on an edge of what was searched, evaluate the next
    decade beyond it, within ``bounds``. The search also stops when the edge improves on its neighbour by
    less than ``flat`` (relative, on the key's first figure): the figure has stopped moving there.
    -> (results by value, chosen value, values added, why it stopped: ``inside``, ``flat`` or ``bound``)."""
    res = {}
    for v in grid:
        _check_cancel()
        res[float(v)] = evaluate(float(v))
    added = []
    while True:
        order = sorted(res)
        best = max(order, key=lambda v: res[v]["key"])
        if best not in (order[0], order[-1]):
            return res, best, added, "inside"
        inner = order[1] if best == order[0] else order[-2]
        a, b = res[best]["key"][0], res[inner]["key"][0]
        if abs(a - b) < flat * max(abs(a), abs(b)):
            return res, best, added, "flat"
        nxt = _decade(best, -1 if best == order[0] else 1)
        if not bounds[0] * (1 - 1e-9) <= nxt <= bounds[1] * (1 + 1e-9):
            return res, best, added, "bound"
        _check_cancel()
        res[nxt] = evaluate(nxt)
        added.append(nxt)


def _logistic_probe(x: dict, y_tr, y_va, target: str, n_classes: int, sh: "_Shared | None" = None):
    """L2 logistic regression (L-BFGS, multinomial), C searched on val accuracy (ties: lower val log-loss),
    each fit warm-started from the nearest C already fitted and continued until L-BFGS converges.

    With ``sh`` (a grid's shared work, :class:`ProbeCache`), each C is first solved by
    :func:`_fast_logistic` (preconditioned, on the shared centred rows and Gram matrix) and then handed to
    scikit-learn warm-started from that solution: scikit-learn's own solver and convergence test have the
    last word (it stops at once when the point already meets its criterion), so the fit is scikit-learn's
    optimum either way; ``iterations`` counts both solvers' iterations."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    m = LogisticRegression(C=1.0, max_iter=MAX_ITER, tol=TOL, warm_start=True)
    states: dict = {}
    if sh is not None:
        classes = np.unique(y_tr)
        k = len(classes)
        y_idx = np.searchsorted(classes, y_tr)
        zero = (np.zeros((1 if k == 2 else k, sh.d)), np.zeros(1 if k == 2 else k))
    sel = selection_metric(target)

    def evaluate(c):
        if states:  # start from the fit of the nearest C already searched
            near = min(states, key=lambda v: abs(math.log10(v) - math.log10(c)))
            m.coef_, m.intercept_ = states[near][0].copy(), states[near][1].copy()
        iters, converged = 0, False
        if sh is not None:  # from the nearest C's fit (set above), or from 0; or the path's line through the
            start = (m.coef_, m.intercept_) if states else zero  # two nearest fits, if its objective is lower
            [(coef, icpt)], it0 = _fast_logistic(sh, y_idx, k, [c], [start], MAX_ITER_TOTAL,
                                                 others=_path_line(states, c))
            m.coef_, m.intercept_ = coef.astype(np.float64), np.asarray(icpt, dtype=np.float64)
            iters += it0
        while not converged and iters < MAX_ITER_TOTAL:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                m.set_params(C=c, max_iter=min(MAX_ITER, MAX_ITER_TOTAL - iters)).fit(x["train"], y_tr)
            iters += int(np.max(m.n_iter_))
            converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        states[c] = (m.coef_.copy(), m.intercept_.copy())
        pv = _proba_pred(target, m.predict_proba(x["val"]), m.classes_, n_classes)
        score = float(face_scores(target, y_va, pv["pred"])[sel].mean())  # the figure, without its interval
        ll = float(-np.log(np.clip(pv["proba"][np.arange(len(y_va)), y_va], 1e-15, None)).mean())
        return {"key": (score, -ll), "pv": pv, "row": {"C": c, f"val_{sel}": score, "val_log_loss": ll,
                                                       "iterations": iters, "converged": converged}}

    res, c, added, stopped = _search(C_GRID, C_BOUNDS, evaluate)
    m.coef_, m.intercept_ = states[c]
    solver = {"solver": "preconditioned L-BFGS on the grid's shared centred rows, finished by scikit-learn"} if sh else {}
    pt = _proba_pred(target, m.predict_proba(x["test"]), m.classes_, n_classes)
    chosen = res[c]["row"]
    return res[c]["pv"], pt, {
        "model": "LogisticRegression(C), L-BFGS", "param": "C", "grid": sorted(res), "extended": added,
        "bounds": list(C_BOUNDS), "chosen": c, "stopped": stopped, "at_edge": stopped == "bound",
        "iterations": chosen["iterations"], "converged": chosen["converged"], "max_iter": MAX_ITER,
        "max_iter_total": MAX_ITER_TOTAL, "tol": TOL, **solver,
        "search": [res[v]["row"] for v in sorted(res)]}


def _path_line(states: dict, c: float) -> list:
    """The regularisation path's straight line in log C through the two fits nearest to ``c`` (``states``:
    C -> (coef, intercept)), evaluated at ``c``: [] with fewer than two fits. On the UTKFace res12 x 8-bin
    probe this start took C = 0.1 from 90 evaluations (from the nearest fit) to 38, and C = 1 from 39 to 11."""
    if len(states) < 2:
        return []
    c1, c0 = sorted(states, key=lambda v: abs(math.log10(v) - math.log10(c)))[:2]
    t = (math.log10(c) - math.log10(c1)) / (math.log10(c1) - math.log10(c0))
    return [tuple(a1 + t * (a1 - a0) for a1, a0 in zip(states[c1], states[c0]))]


def _ridge_probe(x: dict, y_tr, y_va, sh: "_Shared | None" = None):
    """Ridge regression (with intercept; scikit-learn's objective ||y - Xw - b||^2 + alpha ||w||^2) solved
    exactly for each alpha by a Cholesky solve of the centred train Gram matrix X'X + alpha I (or, when the
    tap is wider than the train rows are many, of XX' + alpha I), the matrix built once in float64;
    alpha searched on val MAE. With ``sh`` (a grid's shared work) the primal Gram matrix is the one
    computed once for the tap's train rows and shared with every other probe on them."""
    from scipy.linalg import LinAlgError, solve

    mu = x["train"].mean(axis=0, dtype=np.float64)
    y = np.asarray(y_tr, dtype=np.float64)
    ym = float(y.mean())
    n, d = x["train"].shape
    step = max(1, (64 << 20) // (8 * max(n, d)))  # float64 slices of about 64 MiB
    primal = d <= n
    if primal and sh is not None:  # the shared Gram matrix; never modified in place
        mu, g = sh.mu, sh.gram
        rhs = np.zeros(d)
        for i in range(0, n, step):
            rhs += (x["train"][i : i + step] - mu).T @ (y[i : i + step] - ym)
        apply = {k: x[k] - mu for k in ("val", "test")}
    elif primal:  # w = (X'X + alpha I)^-1 X'y; X'X summed over row slices
        g, rhs = np.zeros((d, d)), np.zeros(d)
        for i in range(0, n, step):
            xb = x["train"][i : i + step] - mu
            g += xb.T @ xb
            rhs += xb.T @ (y[i : i + step] - ym)
        apply = {k: x[k] - mu for k in ("val", "test")}  # prediction = (X_k - mu) w
    else:  # w = X'(XX' + alpha I)^-1 y; XX' and the val/test rows' products with X' summed over column slices
        g, rhs = np.zeros((n, n)), y - ym
        apply = {k: np.zeros((len(x[k]), n)) for k in ("val", "test")}
        for j in range(0, d, step):
            xb = x["train"][:, j : j + step] - mu[j : j + step]
            g += xb @ xb.T
            for k in apply:
                apply[k] += (x[k][:, j : j + step] - mu[j : j + step]) @ xb.T
    diag = np.arange(len(g))
    coef: dict = {}

    def solve_for(alpha):
        if alpha not in coef and sh is not None and primal:
            ga = g.copy()
            ga[diag, diag] += alpha
            try:
                coef[alpha] = solve(ga, rhs, assume_a="pos", overwrite_a=True)
            except LinAlgError:
                ga = g.copy()
                ga[diag, diag] += alpha
                coef[alpha] = solve(ga, rhs, assume_a="sym", overwrite_a=True)
        if alpha not in coef:
            g[diag, diag] += alpha
            try:
                coef[alpha] = solve(g, rhs, assume_a="pos")
            except LinAlgError:  # not positive definite in floating point: a symmetric solve
                coef[alpha] = solve(g, rhs, assume_a="sym")
            finally:
                g[diag, diag] -= alpha
        return coef[alpha]

    def predict(alpha, k):
        return {"pred": np.clip(apply[k] @ solve_for(alpha) + ym, 0.0, None)}

    def evaluate(alpha):
        pv = predict(alpha, "val")
        mae = float(face_scores("age", y_va, pv["pred"])["mae"].mean())  # the figure, without its interval
        return {"key": (-mae,), "pv": pv, "row": {"alpha": alpha, "val_mae": mae}}

    res, a, added, stopped = _search(ALPHA_GRID, ALPHA_BOUNDS, evaluate, flat=FLAT_MAE)
    return res[a]["pv"], predict(a, "test"), {
        "model": "Ridge(alpha), exact", "param": "alpha", "grid": sorted(res), "extended": added,
        "bounds": list(ALPHA_BOUNDS), "chosen": a, "stopped": stopped, "at_edge": stopped == "bound",
        "iterations": None, "converged": True,
        "solver": "Cholesky solve of the centred train Gram matrix " + ("X'X" if primal else "XX'") + " + alpha I",
        "search": [res[v]["row"] for v in sorted(res)]}


# ---- the grid's probes: one read, one standardisation, one Gram matrix per tap for every target and C / alpha

#: Directions of the train Gram matrix resolved exactly by the logistic probe's preconditioner (the rest share
#: one scale); taps up to EIGH_FULL wide get a full eigendecomposition.
PRECOND_RANK = 256
EIGH_FULL = 1536
#: Row ranges of the shared Gram matrix that separate threads may compute (see :attr:`_Shared.gram`).
GRAM_PARTS = 2
#: The fast solver stops where scikit-learn's gradient test passes with this margin (scikit-learn, warm-started
#: from that point, then confirms it without an iteration).
STOP_MARGIN = 0.8


class _Shared:
    """The work a tap's probes share, for one set of train rows of one standardised design: the centred
    train rows (float32), their mean, the centred train Gram matrix X'X in float64 (ridge solves it, the
    logistic probe's preconditioner is read from it), and the preconditioner's eigenpairs, each computed
    once (by whichever probe asks first: the probes of a :class:`featlab.heads.probepool.ProbePool` ask from several
    threads). Only for the primal case (the tap no wider than its train rows are many)."""

    def __init__(self, xtr: np.ndarray):
        self.xtr = xtr
        self.mu = xtr.mean(axis=0, dtype=np.float64)
        self.xc = (xtr - self.mu.astype(np.float32)).astype(np.float32)
        self.n, self.d = xtr.shape
        self._gram = self._eig = None
        self._parts: list | None = None
        self._taken, self._failed = 0, None
        self._gram_cv, self._eig_lock = threading.Condition(), threading.Lock()

    @property
    def gram(self) -> np.ndarray:
        """X'X, summed over GRAM_PARTS fixed row ranges (each over its 64 MiB row slices in order, then the
        parts in order: the same sum whoever computes which part). Threads asking while it is being
        computed take the parts not yet taken: two probes on one tap wait half as long for it."""
        while True:
            with self._gram_cv:
                if self._gram is not None:
                    return self._gram
                if self._failed is not None:
                    raise RuntimeError("the Gram matrix could not be computed") from self._failed
                if self._parts is None:
                    self._parts, self._taken = [None] * GRAM_PARTS, 0
                if self._taken == len(self._parts):
                    self._gram_cv.wait_for(lambda: self._gram is not None or self._failed is not None)
                    continue
                j = self._taken
                self._taken += 1
            try:
                part = self._gram_part(j)
            except BaseException as e:
                with self._gram_cv:
                    self._failed = e
                    self._gram_cv.notify_all()
                raise
            with self._gram_cv:
                self._parts[j] = part
                if all(p is not None for p in self._parts):
                    g = self._parts[0]
                    for p in self._parts[1:]:
                        g += p
                    self._gram, self._parts = g, None
                    self._gram_cv.notify_all()

    def _gram_part(self, j: int) -> np.ndarray:
        step = max(1, (64 << 20) // (8 * max(self.n, self.d)))
        starts = np.array_split(np.arange(0, self.n, step), GRAM_PARTS)[j]
        g = np.zeros((self.d, self.d))
        for i in starts:
            xb = self.xtr[i : i + step] - self.mu  # float64, as the probe alone computes it
            g += xb.T @ xb
        return g

    @property
    def eig(self):
        """(V, lam, lam_rest): the leading eigenpairs of the Gram matrix (all of them up to EIGH_FULL wide;
        else PRECOND_RANK by randomized subspace iteration) and the mean of the remaining eigenvalues."""
        with self._eig_lock:
            return self._make_eig()

    def _make_eig(self):
        if self._eig is None:
            from scipy.linalg import eigh, qr

            g = self.gram
            if self.d <= EIGH_FULL:
                lam, v = eigh(g)
                self._eig = (v, np.clip(lam, 0.0, None), 0.0)
            else:
                rng = np.random.default_rng(0)
                q = qr(g @ rng.standard_normal((self.d, PRECOND_RANK + 16)), mode="economic")[0]
                for _ in range(2):
                    q = qr(g @ q, mode="economic")[0]
                lam, s = eigh(q.T @ g @ q)
                lam, v = lam[::-1][:PRECOND_RANK], (q @ s[:, ::-1])[:, :PRECOND_RANK]
                rest = max(float(np.trace(g)) - float(lam.sum()), 0.0) / (self.d - PRECOND_RANK)
                self._eig = (v, np.clip(lam, 0.0, None), rest)
        return self._eig


class _Done(Exception):
    pass


def _fast_logistic(sh: _Shared, y_idx, k: int, cs, starts, max_iter: int, others=()):
    """L2 logistic regression for each C of ``cs`` at once, in scikit-learn's parametrisation and objective
    (mean log-loss over the train rows + ||W||^2 / (2 C n), intercept not penalised; binary: one logit;
    multinomial: K logits), solved by scipy's L-BFGS on the sum of the independent problems (one matrix
    product over the shared centred rows serves every C) in preconditioned coordinates: the multinomial's
    coefficients in the K-1 class contrasts (their class mean is 0 at the optimum: the loss does not see it
    and the penalty takes it to 0), each contrast scaled by the inverse square root of an approximate
    Hessian, c * lam / n + 1 / (C n) along the Gram matrix's eigenvectors. Stops at the first point where
    every problem's gradient in scikit-learn's coordinates is below STOP_MARGIN * TOL (scikit-learn's own
    criterion, with a margin). Several C at once cost fewer passes over the rows per iteration but, on the
    demo's res12 x bins8, 2.4x the iterations of the hardest C alone: :func:`_logistic_probe` solves them
    one by one, each from the nearest C's fit. ``starts``: (coef, intercept) per C; ``others`` (one C only):
    further starting points, the solver starting from whichever has the lowest objective. The class
    contrasts are the eigenvectors of the curvature at the class priors, diag(pi) - pi pi' (``c`` its
    eigenvalues): exact at the start for centred rows. -> ([(coef, intercept)] per C, iterations)."""
    from scipy.optimize import minimize

    n, d, xc = sh.n, sh.d, sh.xc
    binary = k == 2
    prior = np.bincount(np.asarray(y_idx), minlength=k) / n
    if binary:
        hm, cc = np.ones((1, 1)), np.array([prior[1] * (1.0 - prior[1])])
        yy = (np.asarray(y_idx) == 1).astype(np.float64)[:, None]
    else:  # the class curvature diag(prior) - prior prior' : its K-1 eigenvectors orthogonal to the all-ones vector
        a, u = np.linalg.eigh(np.diag(prior) - np.outer(prior, prior))
        hm, cc = u[:, 1:], a[1:]
        yy = np.zeros((n, k))
        yy[np.arange(n), y_idx] = 1.0
    cc = np.maximum(cc, 1e-12)
    m, kk, nc = hm.shape[1], hm.shape[0], len(cs)
    v, lam, rest = sh.eig
    dd = [lam[:, None] * cc / n + 1.0 / (c * n) for c in cs]
    dr = [cc * rest / n + 1.0 / (c * n) for c in cs]

    def power(u, j, e):  # P_j^e u, P_j = V diag(dd_j) V' + dr_j (I - V V')
        return v @ ((dd[j] ** e - dr[j] ** e) * (v.T @ u)) + dr[j] ** e * u

    def pack(starts):
        p0 = []
        for j, (coef0, icpt0) in enumerate(starts):
            wf = np.asarray(coef0, dtype=np.float64).T
            p0.append(power(wf @ hm, j, 0.5).ravel())
        for j, (coef0, icpt0) in enumerate(starts):
            wf = np.asarray(coef0, dtype=np.float64).T
            p0.append(np.sqrt(cc) * ((np.asarray(icpt0, dtype=np.float64) + sh.mu @ wf) @ hm))
        return np.concatenate(p0)

    p0 = pack(starts)
    state = {"evals": 0, "best": None}
    inv = np.array([1.0 / (c * n) for c in cs])

    def unpack(p):
        ws = [power(p[j * d * m: (j + 1) * d * m].reshape(d, m), j, -0.5) for j in range(nc)]
        bs = p[nc * d * m:].reshape(nc, m) / np.sqrt(cc)
        return ws, bs

    def fg(p):
        _check_cancel()
        state["evals"] += 1
        ws, bs = unpack(p)
        wf = np.concatenate([w @ hm.T for w in ws], axis=1)  # d x (K * len(cs)); binary: d x len(cs)
        z = (xc @ wf.astype(np.float32)).astype(np.float64) + np.concatenate([hm @ b for b in bs])
        z = z.reshape(n, nc, kk)
        if binary:
            loss = np.mean(np.logaddexp(0.0, z) - yy[:, None, :] * z, axis=0).sum(axis=1)
            r = (1.0 / (1.0 + np.exp(-z)) - yy[:, None, :]) / n
        else:
            zmax = z.max(axis=2, keepdims=True)
            lse = zmax + np.log(np.exp(z - zmax).sum(axis=2, keepdims=True))
            loss = np.mean(lse[..., 0] - (z * yy[:, None, :]).sum(axis=2), axis=0)
            r = (np.exp(z - lse) - yy[:, None, :]) / n
        loss = loss + 0.5 * inv * np.array([float((w * w).sum()) for w in ws])
        xr = (xc.T @ r.reshape(n, nc * kk).astype(np.float32)).astype(np.float64)  # d x (K * len(cs))
        rs = r.sum(axis=0)  # len(cs) x K
        # scikit-learn's gradient (uncentred design, its intercept): X'r + W/(Cn) and sum(r)
        gsk = xr + np.outer(sh.mu, rs.ravel()) + wf * np.repeat(inv, kk)
        if max(float(np.abs(gsk).max()), float(np.abs(rs).max())) <= STOP_MARGIN * TOL:
            state["best"] = p.copy()
            raise _Done
        gw = [power(xr[:, j * kk: (j + 1) * kk] @ hm + ws[j] * inv[j], j, -0.5).ravel() for j in range(nc)]
        return float(loss.sum()), np.concatenate([*gw, ((rs @ hm) / np.sqrt(cc)).ravel()])

    try:
        if others:  # one C, several starting points: the one with the lowest objective
            p0 = min([p0, *(pack([o]) for o in others)], key=lambda p: fg(p)[0])
        res = minimize(fg, p0, jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "maxls": 50, "gtol": 1e-12, "ftol": 64 * np.finfo(float).eps})
        p, nit = res.x, int(res.nit)
    except _Done:
        p, nit = state["best"], state["evals"]
    ws, bs = unpack(p)
    out = []
    for w, b in zip(ws, bs):
        wf = w @ hm.T
        out.append((wf.T.copy(), hm @ b - sh.mu @ wf))
    return out, nit


class ProbeCache:
    """The linear probes of a grid share their work: one tap's standardised design (every row of the file,
    read once when it fits the budget) serves every head on that tap that reads it the same way (pooling,
    mean, std), and one :class:`_Shared` (centred train rows, Gram matrix, preconditioner) serves every
    target with the same train rows and every C and alpha. Holds one tap at a time (the grid's heads come
    tap by tap). Pass it to :func:`fit_baselines` as ``shared``."""

    def __init__(self):
        self.key = None
        self.x = None
        self.shared: dict = {}
        self.stats = {"designs": 0, "grams": 0}

    def design(self, store: FeatureStore, key: str, pool, mean, std, budget: int):
        sig = (key, pool, np.asarray(mean, np.float32).tobytes(), np.asarray(std, np.float32).tobytes())
        if sig != self.key:
            self.key, self.x, self.shared = sig, None, {}
            if store.nrows * row_bytes(store, key) <= budget:
                self.x = _design(store, key, np.arange(store.nrows), pool, mean, std, budget)
                self.stats["designs"] += 1
        return self.x

    def solver(self, tr: np.ndarray) -> _Shared:
        sig = np.asarray(tr, np.int64).tobytes()
        if sig not in self.shared:
            self.shared[sig] = _Shared(self.x[tr])
            self.stats["grams"] += 1
        return self.shared[sig]


def fit_baselines(store: FeatureStore, cfg: dict, head_dir: Path, memory_mb: float = 2048,
                  shared: "ProbeCache | None" = None) -> dict:
    """Fit and score the majority and linear baselines of the head in ``head_dir`` (see the module doc).
    ``shared``: a :class:`ProbeCache` shared by the heads of a grid (their probes read and standardise
    each tap once and share its Gram matrix and preconditioner); None: this head's probe on its own."""
    head_dir = Path(head_dir)
    fitted = prepare_baselines(store, cfg, memory_mb, shared, head_stats(head_dir))()
    return write_baselines(head_dir, fitted, check=False)  # fitted from this folder's own config and statistics


def head_stats(head_dir: Path):
    """The head's input standardisation (mean, std) from its ``standardisation.npz``; None without one."""
    f = Path(head_dir) / "standardisation.npz"
    if not f.is_file():
        return None
    z = np.load(f)
    return z["mean"], z["std"]


#: What of a head's config.json the baselines read (:func:`featlab.heads.train.probe_config` gives it before the
#: head is saved; :func:`write_baselines` checks it against the saved config).
PROBE_CONFIG = ("tap", "target", "cats", "class_names", "target_name", "fold", "hyperparameters.pool",
                "hyperparameters.val_share")


def _probe_fields(cfg: dict) -> dict:
    """``PROBE_CONFIG`` of a head's config."""
    hp = cfg.get("hyperparameters", {})
    return {k: hp.get(k.split(".", 1)[1]) if "." in k else cfg.get(k) for k in PROBE_CONFIG}


def prepare_baselines(store: FeatureStore, cfg: dict, memory_mb: float = 2048, shared: "ProbeCache | None" = None,
                      stats=None):
    """:func:`fit_baselines` in steps: this one reads everything it needs from ``store`` (labels, the
    probe's design, standardised by ``stats``: the head's (mean, std), None: no probe) and returns a function
    of no arguments that fits and scores the baselines; :func:`write_baselines` writes what it returns into
    the head's folder. That function touches no HDF5 file and no folder, so it may run in another thread
    (:class:`featlab.heads.probepool.ProbePool`), and before the head itself is trained and saved."""
    target, cats = cfg["target"], cfg.get("cats")
    labels = store.labels()
    y_all, valid = encode_target(labels, target, cats)
    hp = cfg.get("hyperparameters", {})
    sp = split_rows(labels, valid, cfg.get("fold"), float(hp.get("val_share", 0.1)))
    tr, va, te = sp["train"], sp["val"], sp["test"]
    n_classes = len(cfg.get("class_names") or []) or 1
    names = cfg.get("class_names")
    out: dict = {}
    preds: dict = {}

    # ---- majority / median
    if target == "age":
        const = float(np.median(y_all[tr]))
        setting = {"predicts": f"the median training age, {const:g}"}
        make = lambda rows: {"pred": np.full(len(rows), const)}  # noqa: E731
    else:
        k = int(np.bincount(y_all[tr], minlength=n_classes).argmax())
        setting = {"predicts": f"the most frequent training class, {names[k]}"}

        def make(rows):
            proba = np.zeros((len(rows), n_classes))
            proba[:, k] = 1.0
            return {"pred": np.full(len(rows), k, dtype=np.int64), "proba": proba}
    preds["majority"] = ({"val": make(va), "test": make(te)}, setting)

    # ---- linear probe on the head's standardised input
    key = cfg["tap"]
    budget = int(float(memory_mb) * (1 << 20))
    need = (len(tr) + len(va) + len(te)) * row_bytes(store, key)
    x = sh = None
    if stats is not None and need <= budget:
        mean, std = stats
        pool = hp.get("pool")
        whole = shared.design(store, key, pool, mean, std, budget) if shared is not None else None
        if whole is not None:
            x = {s: whole[r] for s, r in (("train", tr), ("val", va), ("test", te))}
        else:
            x = {s: _design(store, key, r, pool, mean, std, budget) for s, r in (("train", tr), ("val", va), ("test", te))}
        sh = shared.solver(tr) if whole is not None and x["train"].shape[1] <= len(tr) else None
    else:
        out["linear"] = {"skipped": ("no standardisation.npz beside the head" if stats is None else
                                     f"the tap needs {need >> 20} MiB, over the {int(memory_mb)} MiB budget")}
    rows = {"val": va, "test": te}
    subs = {split: labels.iloc[r].copy() for split, r in rows.items()}  # the worker's own copy of what it scores

    def run() -> dict:
        from threadpoolctl import threadpool_limits

        load_blas()
        warn = None
        if x is not None:
            with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
                if target == "age":
                    pv, pt, setting = _ridge_probe(x, y_all[tr], y_all[va], sh)
                else:
                    pv, pt, setting = _logistic_probe(x, y_all[tr], y_all[va], target, n_classes, sh)
            preds["linear"] = ({"val": pv, "test": pt},
                               {**setting, "chosen_on": "val",
                                "input": "the head's standardised input (train-row mean/std)"})
            if not setting["converged"] or setting["at_edge"]:
                what = (f"did not converge in {setting['iterations']} L-BFGS iterations" if not setting["converged"]
                        else f"chose {setting['param']} = {setting['chosen']:g}, at the bound of its search "
                             f"({setting['bounds'][0]:g}..{setting['bounds'][1]:g})")
                warn = f"linear probe of {key} -> {cfg.get('target_name', target)} {what}"
        out_, faces = _score_baselines(target, cats, names, y_all, rows, subs, preds, dict(out))
        return {"out": out_, "faces": faces, "warning": warn, "config": _probe_fields(cfg),
                "stats": None if stats is None else tuple(np.asarray(a).copy() for a in stats)}

    return run


def write_baselines(head_dir: Path, fitted: dict, check: bool = True) -> dict:
    """Write what :func:`prepare_baselines`' function returned into the head's folder: ``baselines.json``
    and ``baselines_faces.csv``; a probe that did not converge or chose a bound says so on stderr. With
    ``check``, the probe must have read the head as it was saved: its config (``PROBE_CONFIG``) and
    standardisation (:func:`fit_baselines`, which read them from the folder itself, does not check)."""
    head_dir = Path(head_dir)
    checkpoint("baselines")
    saved = json.loads((head_dir / "config.json").read_text()) if check and (head_dir / "config.json").is_file() else None
    if saved is not None:
        now = _probe_fields(saved)
        stats = head_stats(head_dir)
        same_stats = (stats is None) == (fitted["stats"] is None) and (stats is None or all(
            np.array_equal(a, b) for a, b in zip(stats, fitted["stats"])))
        if json.dumps(now, sort_keys=True, default=str) != json.dumps(fitted["config"], sort_keys=True, default=str) \
                or not same_stats:
            raise RuntimeError(f"{head_dir}: the baselines were fitted for another head than the one saved there")
    if fitted["warning"]:
        print(f"[featlab] warning: {fitted['warning']} (recorded in {head_dir / 'baselines.json'})", file=sys.stderr)
    out, faces = fitted["out"], fitted["faces"]
    (head_dir / "baselines.json").write_text(json.dumps(out, indent=2))
    if faces:
        with open(head_dir / "baselines_faces.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(faces[0]))
            w.writeheader()
            w.writerows(faces)
    return out


def _score_baselines(target, cats, names, y_all, rows: dict, subs: dict, preds: dict, out: dict):
    """Score each baseline's val and test predictions (``subs``: the val and test rows' labels) into ``out``
    (per baseline: settings, val and test figures) and the per-face rows of ``baselines_faces.csv``."""
    faces = []
    for name, (pp, setting) in preds.items():
        entry = {"settings": setting}
        for split in ("val", "test"):
            if not len(rows[split]):
                continue
            sub = subs[split]
            s = score_predictions(target, cats, y_all[rows[split]], pp[split], sub, names)
            entry[split] = {"n": s["n"], "metrics": s["metrics"]}
            ids = sub["image_id"].to_numpy()
            for i, iid in enumerate(ids):
                faces.append({"image_id": iid, "split": split, "baseline": name,
                              **{mm: float(v[i]) for mm, v in s["faces"].items()}})
        out[name] = entry
    return out, faces

