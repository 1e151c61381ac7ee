"""What each lever of a study buys: its answer with and without the lever, paired on the same test faces.

Takes the records of finished studies (``results/``) and gives, per target, one row per configuration of the
study (one seed or the seeds' ensemble, without or with the mirrored faces, a cross-network fusion): the input
validation chooses in that configuration (:func:`answer`, :func:`fusion_answer`), its test figure with its 95 %
interval over people, and a paired test against a reference configuration's answer (the first row) on the
same test faces: the difference with its interval (people resampled), Benjamini-Hochberg within the target,
the equivalence test at the compare margins, and the verdict compare would give (:func:`lever_rows`).

``python -m featlab.study.levers`` prints the table of the shipped UTKFace studies (the README's).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FeatlabError


def _target(tname: str) -> str:
    return "age" if tname == "age" else "gender" if tname == "gender" else "bins"


def _record(d: Path) -> dict:
    m = json.loads((d / "metrics.json").read_text())
    return {"dir": d, "key": m.get("head_key") or m.get("tap"), "tap": m.get("tap"), "kind": m.get("kind", "head"),
            "val": m["val"]["metrics"], "test": m["test"]["metrics"], "n_test": m["test"]["n"]}


def answer(results_root, backbone: str, dataset: str, tname: str, seed: int | None = None) -> dict:
    """The record validation chooses among every input of ``results/BACKBONE/DATASET/*/TNAME`` (the
    selection metric, ties to the first input in name order). ``seed=K``: among each input's ``seedK/``
    record instead, what a study of that one seed chooses (the folder itself holds the seeds' ensemble)."""
    base = Path(results_root) / backbone / dataset
    dirs = sorted(p.parent for p in base.glob(f"*/{tname}/metrics.json"))
    if seed is not None:
        dirs = [d / f"seed{int(seed)}" for d in dirs if (d / f"seed{int(seed)}" / "metrics.json").is_file()]
    if not dirs:
        raise FeatlabError(f"no {tname} record under {base}" + ("" if seed is None else f" with a seed{seed}/ folder"))
    from ..report.compare import choose

    return choose([_record(d) for d in dirs], _target(tname))  # compare's rule: best val figure, ties to the first


def fusion_answer(results_root, networks: str, dataset: str, tname: str) -> dict:
    """The cross-network fusion a two-network study chose on validation for ``tname`` (its
    ``network_comparison.json`` ``best_fusion``), as a record."""
    root = Path(results_root)
    f = root / "compare" / networks / dataset / tname / "network_comparison.json"
    if not f.is_file():
        raise FeatlabError(f"no network comparison at {f}: run the two-network study first")
    best = json.loads(f.read_text()).get("best_fusion")
    if not best:
        raise FeatlabError(f"{f}: no cross-network fusion (cross_fusion in the spec)")
    hits = sorted(p.parent for p in root.glob(f"{best['network']}/*/{best['tap']}/{tname}/metrics.json"))
    if len(hits) != 1:
        raise FeatlabError(f"the fusion {best['network']} {best['tap']} {tname}: {len(hits)} records, not one")
    return _record(hits[0])


def _faces(rec: dict, columns):
    import pandas as pd

    df = pd.read_csv(rec["dir"] / "faces.csv", dtype={"image_id": str, "split": str, "group": str})
    return df[df["split"] == "test"].set_index("image_id")[["group", *columns]]


def lever_rows(answers: list[tuple[str, dict]], tname: str, margins: dict | None = None, seed: int = 0) -> list[dict]:
    """One row per ``(label, record)``: its test figures and intervals, and its paired test against the first
    (the reference) on the same test faces (a different set of faces stops with one line)."""
    from ..report.compare import margins_for
    from ..scoring.uncertainty import adjust, paired_difference, verdict

    target = _target(tname)
    metrics = ["mae", "cs5"] if target == "age" else ["accuracy"] + (["one_off"] if target == "bins" else [])
    margin = margins_for(metrics, margins)
    ref_label, ref = answers[0]
    a_ref = _faces(ref, metrics)
    rows, tests = [], []
    for label, rec in answers:
        a = _faces(rec, metrics)
        if set(a.index) != set(a_ref.index):
            raise FeatlabError(f"{label} ({rec['dir']}) scored other test faces than {ref_label} ({ref['dir']}): "
                               "a paired test needs the same faces")
        a = a.loc[a_ref.index]
        row = {"configuration": label, "input": rec["key"], "record": str(rec["dir"]), "n_test": int(len(a))}
        for m in metrics:
            row[m] = rec["test"][m]
            row[f"{m}_ci95"] = rec["test"].get(f"{m}_ci95")
            row[f"val_{m}"] = rec["val"].get(m)
        if rec is not ref:
            m = metrics[0]
            t = paired_difference(a[m].to_numpy(), a_ref[m].to_numpy(), seed=seed, groups=a_ref["group"].to_numpy(),
                                  margin=margin[m])
            row.update({"diff": t["diff"], "diff_ci95": t["ci95"], "p_raw": t["p"], "p_equivalence_raw": t["p_equivalence"]})
            tests.append(row)
        rows.append(row)
    for key in ("p", "p_equivalence"):
        for row, p in zip(tests, adjust([r[f"{key}_raw"] for r in tests])):
            row[key] = p
    for row in tests:
        row["verdict"] = verdict(row["diff"], row["p"], row["p_equivalence"], metrics[0] == "mae")
    return rows


def table(rows_by_target: dict[str, list[dict]]) -> str:
    """The rows as one markdown table (per target, the reference first)."""
    out = ["| target | configuration | input chosen on val | test (95 % CI, people) | vs the first row (95 % CI) "
           "| BH p | verdict |", "|---|---|---|---|---|---|---|"]
    for tname, rows in rows_by_target.items():
        m = "mae" if tname == "age" else "accuracy"
        scale, unit, nd = (1.0, "", 2) if m == "mae" else (100.0, " %", 1)
        for r in rows:
            ci = r.get(f"{m}_ci95") or [float("nan")] * 2
            fig = f"{r[m] * scale:.{nd}f} [{ci[0] * scale:.{nd}f}, {ci[1] * scale:.{nd}f}]{unit}"
            if "diff" in r:
                d, (lo, hi) = r["diff"] * scale, [x * scale for x in r["diff_ci95"]]
                vs = f"{d:+.{nd}f} [{lo:+.{nd}f}, {hi:+.{nd}f}]"
                p, v = f"{r['p']:.3f}", r["verdict"]
            else:
                vs, p, v = "reference", "", ""
            out.append(f"| {tname} | {r['configuration']} | `{r['input']}` | {fig} | {vs} | {p} | {v} |")
    return "\n".join(out)


SHIPPED = [  # (label, how its answer is found) for the shipped UTKFace studies; the first is the reference
    ("one seed, no mirror (the study before #32)", ("answer", "dlib-rec", "utkface-dlib-rec", None)),
    ("one seed + mirror", ("answer", "dlib-rec", "utkface-dlib-rec-flip", 0)),
    ("ensemble of 3 seeds + mirror (utkface-dlib-rec.toml)", ("answer", "dlib-rec", "utkface-dlib-rec-flip", None)),
    ("cross fusion, one seed, no mirror (the two-network study before #32)",
     ("fusion", "dlib-rec+sface-template-5pt+sface-resize", "utkface-two-networks")),
    ("cross fusion + ensemble + mirror (utkface-two-networks.toml)",
     ("fusion", "dlib-rec+sface-template-5pt+sface-resize", "utkface-two-networks-flip")),
]


def seed_choices(results_root, backbone: str, dataset: str, tname: str) -> dict:
    """What validation chooses with each seed alone (``seedK/`` records) and with their ensemble."""
    base = Path(results_root) / backbone / dataset
    seeds = sorted({int(p.parent.name[4:]) for p in base.glob(f"*/{tname}/seed*/metrics.json")})
    return {"single seeds": {k: answer(results_root, backbone, dataset, tname, k)["key"] for k in seeds},
            "ensemble": answer(results_root, backbone, dataset, tname)["key"]}


def shipped_answers(results_root, tname: str, missing: list | None = None) -> list[tuple[str, dict]]:
    """The answers of :data:`SHIPPED` for ``tname``. A configuration not run yet stops with its one line, or,
    with ``missing`` (a list), is left out and its line appended there (the reference never is)."""
    out = []
    for i, (label, how) in enumerate(SHIPPED):
        try:
            if how[0] == "answer":
                out.append((label, answer(results_root, how[1], how[2], tname, how[3])))
            else:
                out.append((label, fusion_answer(results_root, how[1], how[2], tname)))
        except FeatlabError as e:
            if missing is None or i == 0:
                raise
            missing.append(f"{tname}: {label}: {e}")
    return out


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="the results folder [results]")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    missing: list = []
    rows = {t: lever_rows(shipped_answers(args.results, t, missing), t) for t in ("bins8", "age", "gender")}
    print(table(rows))
    for line in missing:
        print(f"not run yet, left out: {line}")
    print()
    for t in rows:
        c = seed_choices(args.results, "dlib-rec", "utkface-dlib-rec-flip", t)
        print(f"{t}: validation chooses " + ", ".join(f"`{k}` with seed {s} alone" for s, k in c["single seeds"].items())
              + f"; `{c['ensemble']}` with their ensemble")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
