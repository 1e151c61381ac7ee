"""Figures say what they show: legends outside the data, age groups labelled with their real edges, a
history that ran into its epoch cap says so, the scatter's median covers the whole age range. The figures
are caught before saving (``plots._save``) and measured on the drawn canvas."""

from __future__ import annotations

import re

import numpy as np
import pytest

from featlab.scoring import plots
from featlab.data.bins import SCHEMES, get_scheme, group_labels

TAPS = ["res12", "res14", "embedding", "res12+res14+embedding"]


@pytest.fixture
def figures(monkeypatch):
    caught = []

    def keep(fig, path):
        caught.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return caught


def _rows(metrics, base, majority):
    """Comparison rows as compare() writes them: head and linear probe per tap, the majority baseline."""
    sel = "mae" if "mae" in metrics else "accuracy"

    def ci(m):
        return ("ci95_low", "ci95_high") if m == sel else (f"{m}_ci95_low", f"{m}_ci95_high")

    rows = []
    for i, tap in enumerate(TAPS):
        for reader, off in (("head", 0.0), ("linear", 0.02)):
            r = {"tap": tap, "reader": reader, "chosen": reader == "head" and i == 2, "indistinguishable": i >= 2}
            for m in metrics:
                r[m] = base[m] + 0.01 * i + off
                r[ci(m)[0]], r[ci(m)[1]] = r[m] - 0.06, r[m] + 0.06
            rows.append(r)
    r = {"tap": "", "reader": "majority", "chosen": False}
    for m in metrics:  # the majority line and its band cross the panel where a "best" legend would sit
        r[m] = majority[m]
        r[ci(m)[0]], r[ci(m)[1]] = majority[m] - 0.03, majority[m] + 0.03
    rows.append(r)
    return rows


def _assert_legends_outside(fig, n_legends):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == n_legends
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "legend on a panel's data area"
            texts = [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.title]
            for t in texts:
                if t.get_text():
                    assert not box.overlaps(t.get_window_extent(renderer)), f"legend on {t.get_text()!r}"


def test_comparison_legends_sit_below_each_panel_off_the_error_bars_and_baselines(figures):
    plots.comparison_png(_rows(["mae", "cs5"], {"mae": 7.0, "cs5": 0.6}, {"mae": 8.0, "cs5": 0.62}), TAPS,
                         ["mae", "cs5"], "age.png", title="age")
    plots.comparison_png(_rows(["accuracy", "one_off"], {"accuracy": 0.45, "one_off": 0.85},
                               {"accuracy": 0.3, "one_off": 0.6}), TAPS, ["accuracy", "one_off"], "bins.png")
    for fig in figures:
        _assert_legends_outside(fig, 2)
        for ax in fig.axes:  # everything the panel's legend named is still in it
            labels = ax.get_legend().get_texts()
            assert any(t.get_text().startswith("majority") for t in labels)
            assert any(t.get_text().startswith("linear probe: ") for t in labels)


def test_history_scatter_and_sweep_legends_sit_outside_the_data(figures):
    rng = np.random.default_rng(0)
    n = 30
    h = {"loss": list(1 / np.arange(1, n + 1)), "val_loss": list(1.1 / np.arange(1, n + 1)),
         "accuracy": list(1 - 0.5 / np.arange(1, n + 1)), "val_accuracy": list(0.9 - 0.5 / np.arange(1, n + 1))}
    plots.history_png(h, "h.png", best_epoch=30, max_epochs=30)
    t = rng.uniform(1, 90, 300)
    plots.scatter_png(t, t + rng.normal(0, 5, 300), "s.png")
    plots.sweep_png([1, 2, 3, 4], TAPS, [0.5, 0.6, 0.7, 0.65], "w.png", "accuracy", reference=0.55,
                    reference_label="majority", intervals=[(0.45, 0.75)] * 4, chosen=[0, 0, 1, 0])
    for fig, k in zip(figures, (2, 1, 1)):
        _assert_legends_outside(fig, k)


def _interval(label):
    lo, hi = re.search(r"\[([\d.]+), ([\d.]+|∞)\)$", label).groups()
    return float(lo), float("inf") if hi == "∞" else float(hi)


def test_eight_group_labels_show_the_real_contiguous_edges():
    s = get_scheme(8)
    labels = s.labels()
    assert [lab.split(" [")[0] for lab in labels] == list(s.names)
    edges = [_interval(lab) for lab in labels]
    assert [lo for lo, _ in edges] == list(s.lower)  # 0, 3, 7, 14, 22.5, 35, 45.5, 56.5
    assert [hi for _, hi in edges] == list(s.lower[1:]) + [float("inf")]  # contiguous: no age falls between
    # a 34-year-old is in the group whose label says so; so is a 22.5-year-old, a 2.9 and a 56.5
    for age in (34, 22.5, 2.9, 56.5, 90):
        lo, hi = edges[int(s.assign(age))]
        assert lo <= age < hi
    # 5 and 7 groups: their names already say it for whole years
    for key in ("5", "7"):
        assert SCHEMES[key].labels() == list(SCHEMES[key].names)
    assert group_labels(["f", "m"]) == ["f", "m"]


def test_the_confusion_figure_of_eight_groups_carries_the_edges(figures, tmp_path):
    from featlab.scoring.scores import write_confusion

    s = get_scheme(8)
    cm = np.arange(64).reshape(8, 8) % 7
    write_confusion(tmp_path, "confusion", cm, list(s.names), "t", 0.5, 0.8, plots)
    (fig,) = figures
    ax = fig.axes[0]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == s.labels()
    assert [t.get_text().split("  (n=")[0] for t in ax.get_yticklabels()] == s.labels()
    # the CSV keeps the scheme's names (other code reads them)
    assert (tmp_path / "confusion.csv").read_text().splitlines()[0].split(",")[1:] == list(s.names)


def test_a_history_that_ran_into_its_epoch_cap_says_so(figures):
    n = 60
    h = {"loss": list(np.linspace(1, 0.2, n)), "val_loss": list(np.linspace(1.2, 0.4, n)),
         "mae_years": list(np.linspace(20, 5, n)), "val_mae_years": list(np.linspace(21, 7, n))}
    plots.history_png(h, "capped.png", metric="mae_years", title="t", best_epoch=60, max_epochs=60)
    plots.history_png({k: v[:40] for k, v in h.items()}, "early.png", metric="mae_years", best_epoch=32,
                      max_epochs=60)
    capped, early = figures
    note = capped._suptitle.get_text()
    assert "stopped at the epoch cap (60 epochs)" in note and "best val at epoch 60" in note
    assert "val still improving" in note
    for ax in capped.axes:  # a line at the cap on both panels, named in the legend
        assert any(list(line.get_xdata()) == [60, 60] and "epoch cap (60)" in line.get_label() for line in ax.lines)
    assert early._suptitle is None or "cap" not in early._suptitle.get_text()
    assert not any("cap" in line.get_label() for ax in early.axes for line in ax.lines)
    assert plots.cap_note(57, 60, 50) is None and plots.cap_note(60, 60, 45).endswith("best val at epoch 45")


def test_the_scatter_median_line_reaches_the_oldest_faces(figures):
    """120 test faces (the demo's split has 119) with ages as in face datasets: dense 20-40, a thin tail
    to 100. Fixed 5-year bands of at least 5 faces stopped at 43 years here (below the 90th percentile);
    the bands widened to 8 faces reach past the 95th and hold every face once."""
    rng = np.random.default_rng(1)
    t = np.clip(rng.gamma(3.0, 10.0, 120), 1, 110)
    p = 0.6 * t + 12 + rng.normal(0, 6, 120)
    plots.scatter_png(t, p, "s.png")
    (fig,) = figures
    (line,) = [x for x in fig.axes[0].lines if x.get_label().startswith("median prediction")]
    xs, ys = line.get_xdata(), line.get_ydata()
    assert xs[0] <= np.quantile(t, 0.10) and xs[-1] >= np.quantile(t, 0.95), (xs[0], xs[-1])
    assert np.all(np.diff(xs) > 0)
    # independently: walk the faces by age, cutting at a 5-year boundary once a band holds 8 faces
    order = np.argsort(t, kind="stable")
    bands, cur = [], [order[0]]
    for a, b in zip(order, order[1:]):
        if t[b] // 5 != t[a] // 5 and len(cur) >= 8:
            bands.append(cur)
            cur = []
        cur.append(b)
    if len(cur) < 8:
        bands[-1] = bands[-1] + cur
    else:
        bands.append(cur)
    assert sum(len(b) for b in bands) == len(t)
    np.testing.assert_allclose(xs, [np.median(t[b]) for b in bands])
    np.testing.assert_allclose(ys, [np.median(p[b]) for b in bands])


def test_comparison_draws_the_baselines_verdicts_names_its_bands_and_labels_values_at_their_points(figures):
    """A linear probe resolved worse than the chosen head is drawn (and named in the legend) as resolved; the
    majority's band and line carry its verdict; every value label sits at its point's height, not at the
    upper whisker; the x axis says the fusions come after the taps."""
    rows = _rows(["accuracy", "one_off"], {"accuracy": 0.45, "one_off": 0.85}, {"accuracy": 0.3, "one_off": 0.6})
    for r in rows:
        if r["reader"] == "linear":
            r["verdict"] = "worse" if r["tap"] == "res12" else "inconclusive"
        elif r["reader"] == "majority":
            r["verdict"] = "worse"
    plots.comparison_png(rows, TAPS, ["accuracy", "one_off"], "bins.png")
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "linear probe: resolved from chosen (BH p < 0.05)" in labels, labels
    assert "linear probe: inconclusive (neither resolved nor equivalent)" in labels
    assert "majority 30.0 (worse than chosen)" in labels and "majority: 95 % CI band" in labels
    heads = {r["tap"]: r for r in rows if r["reader"] == "head"}
    values = [t for t in ax.texts if re.fullmatch(r"[\d.]+", t.get_text())]
    assert len(values) == len(TAPS)
    for t, tap in zip(values, TAPS):
        assert t.xy[1] == pytest.approx(heads[tap]["accuracy"] * 100)  # at the point, not at its upper bound
    assert ax.get_xlabel() == "input: taps in network order →, then fusions of taps (a+b)"


def test_a_confusion_title_carries_its_intervals_and_rows_of_few_faces_are_marked(figures, tmp_path):
    """The age head's binned view gets the interval over people of its own accuracy (equal to a direct
    cluster bootstrap of its per-face hits); rows of fewer than 20 faces carry † and italic shares."""
    from featlab.scoring.scores import _binned_intervals
    from featlab.scoring.uncertainty import interval
    from featlab.scoring import metrics as M

    rng = np.random.default_rng(0)
    y = np.concatenate([rng.uniform(0, 90, 200), rng.uniform(20, 35, 200)])  # most faces in their twenties
    p = y + rng.normal(0, 6, 400)
    groups = np.array([f"g{i // 2}" for i in range(400)], dtype=object)
    s = get_scheme(7)
    rep = M.regression_report(y, p, [s])["binned"]["bins7"]
    acc_ci, off_ci = _binned_intervals(y, p, s, groups, rep)
    t, q = s.assign(y), s.assign(np.clip(p, 0, None))
    assert acc_ci == interval((t == q).astype(float), groups=groups)
    assert acc_ci[0] < rep["accuracy"] < acc_ci[1] and off_ci[0] < rep["one_off"] < off_ci[1]
    cm = np.asarray(rep["confusion"])
    plots.confusion_png(cm, s.names, "c.png", title="t", accuracy=rep["accuracy"], one_off=rep["one_off"],
                        accuracy_ci=acc_ci, one_off_ci=off_ci)
    ax = figures[0].axes[0]
    assert f"accuracy {100 * rep['accuracy']:.1f}% [{100 * acc_ci[0]:.1f}, {100 * acc_ci[1]:.1f}]" in ax.get_title()
    rows = cm.sum(axis=1)
    marked = [t.get_text().endswith("†)") for t in ax.get_yticklabels()]
    assert marked == [bool(n < 20) for n in rows] and any(marked) and not all(marked)
    assert "fewer than 20 faces" in ax.get_xlabel()
