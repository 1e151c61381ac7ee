"""The schema of experiment specs (``featlab run SPEC``): one pydantic model per section.

It is the one source of two things:

- :func:`validate` checks a loaded spec (and every ``--set`` path, :func:`check_set_path`): an unknown
  section or key, a wrong type or an out-of-range value stops with one line (a :class:`FeatlabError`) that
  names the nearest valid key (:mod:`difflib`). The spec itself is left as written: nothing is filled in,
  so the fingerprints of finished steps do not change.
- :func:`spec_reference` writes ``docs/spec.md`` (``featlab spec-doc > docs/spec.md``): every key with its
  type, default and description, and an example for a CSV of your own.

Validation is strict: TOML already gives numbers, booleans, strings and lists their types, so nothing is
coerced (``align = "false"`` is an error, not a true string). A whole number is accepted where a decimal is
expected (``lr = 1``). Adding a key means adding a field here (with its description) and regenerating
``docs/spec.md``; the tests check that every keyword of :func:`featlab.heads.train.fit_head` is a ``[[heads]]`` key.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import FeatlabError, did_you_mean

#: The dataset adapters (featlab.data.datasets.ADAPTERS; a test keeps the two equal).
ADAPTER_NAMES = ("utkface", "imdb", "wiki", "adience", "aaf", "facial-age", "chalearn", "csv")
#: HDF5 compression of the features file (featlab.features.store.COMPRESSION; a test keeps the two equal).
COMPRESSIONS = ("none", "lz4", "zstd", "blosclz")
#: The named preprocessings (featlab.data.faces.PREPROCESSINGS; a test keeps the two equal).
PREPROCESSING_NAMES = ("template-5pt", "resize", "center-crop")
#: Keys of ``fit_head`` a spec does not set per head: the spec's own ``seed``, and featlab's plumbing.
NOT_HEAD_KEYS = ("seed", "out_root", "verbose", "seed_dir")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _key(description: str, **extra):
    """Field metadata: the reference's description, the default shown there when it is not the model's own."""
    return dict(description=description, json_schema_extra=extra or None)


class Options(_Section):
    """Options of the dataset adapter, an inline table (`options = { path_col = "file" }`): `featlab prepare`'s
    flags, with `_` for `-`. An option of another adapter is an error."""

    group_by_face: bool = Field(False, **_key(
        "Group faces by their dlib-rec embedding (complete linkage below 0.35: near-duplicates, one person in one "
        "session) and split by group, so that no group sits on both sides of the split (`--group-by-face`). "
        "Any adapter.", adapters=None))
    face_score_min: float = Field(1.0, **_key("Keep faces whose face_score is above this (`--face-score-min`).",
                                              adapters=["imdb", "wiki"]))
    csv: Optional[str] = Field(None, **_key(
        "The CSV file, relative to `root` or absolute, when `root` is a folder holding several .csv files "
        "(`root` may also be the CSV file itself).", adapters=["csv"], shown="the one .csv file in `root`"))
    path_col: str = Field("path", **_key(
        "Column of image paths (relative paths are relative to the CSV's folder) (`--path-col`).",
        adapters=["csv"]))
    age_col: str = Field("age", **_key(
        "Column of ages in years, 0..120 (`--age-col`); a missing default column means no ages. A cell that is empty, "
        "not a number or outside 0..120 leaves that row without an age, named with its value in the study's "
        "`skipped.csv` (age heads leave it out).",
        adapters=["csv"]))
    gender_col: str = Field("gender", **_key(
        "Column of genders: m/male/man, f/female/woman, any case (`--gender-col`); a missing default column "
        "means no genders.", adapters=["csv"]))
    race_col: Optional[str] = Field(None, **_key("Column of race labels (`--race-col`).", adapters=["csv"]))
    split_col: Optional[str] = Field(None, **_key(
        "Column of train/val/test; without it a seeded split is made, 70/10/20 by a hash of each face's group "
        "(or image id), so other rows never move a face (`--split-col`).", adapters=["csv"]))
    group_col: Optional[str] = Field(None, **_key(
        "Column of an identity (person, subject, session) the split must not divide (`--group-col`).",
        adapters=["csv"]))


class Dataset(_Section):
    """Where the faces come from: a dataset on disk read by an adapter, or a manifest made before."""

    adapter: Optional[Literal[ADAPTER_NAMES]] = Field(None, **_key(
        "The dataset adapter (`featlab prepare --list`); `csv` reads a CSV of your own. The study's files are "
        "named by the spec's top-level `name` (`features/manifests/NAME.csv`, `results/BACKBONE/NAME/`).",
        shown="required unless `manifest` is given"))
    root: Optional[str] = Field(None, **_key(
        "The dataset folder (for `csv`: the CSV file or its folder); `\"@sample\"` is the UTKFace sample "
        "shipped inside featlab. Empty: `[data].ADAPTER` of featlab.toml, else `--set dataset.root=DIR`.",
        shown="`[data].ADAPTER` in featlab.toml"))
    manifest: Optional[str] = Field(None, **_key(
        "A manifest CSV made before (`featlab prepare`): used as it is, no adapter runs."))
    options: Options = Field(default_factory=Options, **_key(
        "Options of the adapter, an inline table: see [dataset.options] below.", shown="`{}`"))


class Backbone(_Section):
    """The frozen network whose taps are probed."""

    name: str = Field(..., **_key("A featlab backbone: r100, r50, dlib-age, dlib-gender, dlib-rec (`featlab layers`)."))
    model: Optional[str] = Field(None, **_key(
        "The model file (ONNX; a .dat for dlib-rec). Empty: `[models].NAME` of featlab.toml, else the "
        "backbone's own (the dlib nets ship with their wheels; r100/r50: InsightFace's packs).",
        shown="`[models].NAME` in featlab.toml"))


class Extract(_Section):
    """Running the backbone once over the manifest into one HDF5 features file (`featlab extract`)."""

    taps: Optional[list[str]] = Field(None, **_key(
        "Taps to store: names, aliases or indices as `featlab layers` lists them; `NAME@avg`, `NAME@max`, "
        "`NAME@avgN` pool one tap.", shown="the backbone's default taps"))
    align: bool = Field(False, **_key("Detect and align every face (in-the-wild images) (`--align`)."))
    preprocessing: Optional[Literal[PREPROCESSING_NAMES]] = Field(None, **_key(
        "How each chip is cut from the face (`--preprocessing`): `template-5pt` (dlib's 5 landmarks, similarity "
        "warp onto the network's own template), `resize` (the whole crop resized, no landmarks) or `center-crop`. "
        "Recorded in the features file; a choice other than the network's default is named in the features "
        "file and the results folder (`utkface-resize`).",
        shown="the network's own: `template-5pt` for dlib and ArcFace networks"))
    flip: bool = Field(False, **_key("Store the mean of each face and its mirror image (`--flip`)."))
    pool: Optional[str] = Field(None, pattern=r"^(avg|max)\d*$", **_key(
        "Pool every tap: avg, max, or avgN/maxN for an NxN grid (`--pool`).", shown="no pooling"))
    dtype: Literal["float16", "float32"] = Field("float16", **_key("Stored dtype (`--dtype`)."))
    compression: Literal[COMPRESSIONS] = Field("none", **_key("HDF5 compression (`--compression`)."))
    batch_size: Optional[Annotated[int, Field(ge=1)]] = Field(None, **_key(
        "Faces per backbone call (`--batch-size`).", shown="the backbone's (32 to 256)"))
    out: Optional[str] = Field(None, **_key("The features file to write.", shown="`features/BACKBONE/DATASET.h5`"))


class Network(_Section):
    """One `[[networks]]` table of a study of several networks on the same faces (instead of `[backbone]`):
    each is extracted into its own features file (the `[extract]` settings apply to all), gets every head,
    and its own comparison; the networks are then compared side by side (relative depth, each network's
    input chosen on validation, paired tests on the same test faces). A backbone listed twice (SFace with two
    preprocessings) is named `NAME-PREPROCESSING` in the cross-network table and in `NETWORK:TAP` fusion keys."""

    name: str = Field(..., **_key("A featlab backbone (`featlab layers`)."))
    model: Optional[str] = Field(None, **_key("The model file.", shown="`[models].NAME` in featlab.toml"))
    preprocessing: Optional[str] = Field(None, **_key(
        "How each face is cut for this network (`resize`, `template-5pt`); part of its feature set.",
        shown="the network's own"))
    taps: Optional[list[str]] = Field(None, **_key("Taps to store, as `[extract] taps`.",
                                                   shown="the backbone's default taps"))


Cats = Literal[5, 7, 8]


class Head(_Section):
    """One `[[heads]]` table: a target, and the hyperparameters of `featlab train-head` (every tap gets one).
    Unset hyperparameters take the head's defaults, shown here."""

    target: Literal["bins", "age", "gender", "regression"] = Field("bins", **_key(
        "What the head predicts: `bins` (age groups), `age` (years; `regression` is the same) or `gender`."))
    cats: Optional[Union[Cats, list[Cats]]] = Field(None, **_key(
        "bins: the age-group schemes, 5, 7 or 8 groups (`featlab bins`); a list trains one head per scheme.",
        shown="7"))
    fold: Optional[Union[Annotated[int, Field(ge=0)], Literal["all"]]] = Field(None, **_key(
        "Adience's protocol: `\"all\"` trains one head per fold (mean and spread), K tests on fold K only.",
        shown="the manifest's train/val/test split"))
    seeds: Annotated[int, Field(ge=1)] = Field(1, **_key(
        "Train N heads (seed, seed+1, ...): their ensemble (the mean of their predictions) is the head "
        "compared and chosen on validation, each figure's spread over seeds beside it."))
    hidden: Optional[Union[list[Annotated[int, Field(ge=0)]], str, Annotated[int, Field(ge=0)]]] = Field(None, **_key(
        "Hidden layer sizes, `[512, 128]` or `\"512,128\"`; `0` or `[]`: a linear head (`--hidden`)."))
    dropout: Optional[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(None, **_key("Dropout after each hidden layer (`--dropout`)."))
    input_dropout: Optional[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(None, **_key(
        "Dropout on the standardised inputs.", shown="0.5 on inputs of 512 features or more, else 0.2"))
    epochs: Optional[Annotated[int, Field(ge=1)]] = Field(None, **_key("Most epochs; early stopping ends sooner (`--epochs`)."))
    batch_size: Optional[Annotated[int, Field(ge=1)]] = Field(None, **_key("Training batch size."))
    lr: Optional[Annotated[float, Field(gt=0.0)]] = Field(None, **_key("Learning rate (`--lr`)."))
    optimizer: Optional[Literal["adam", "adamw", "sgd"]] = Field(None, **_key("Optimizer (sgd: Nesterov momentum)."))
    weight_decay: Optional[Annotated[float, Field(ge=0.0)]] = Field(None, **_key("Weight decay (adamw, sgd)."))
    patience: Optional[Annotated[int, Field(ge=1)]] = Field(None, **_key("Early-stopping patience in epochs."))
    monitor: Optional[Literal["val_loss", "val_metric"]] = Field(None, **_key(
        "What early stopping watches: the val loss, or the val accuracy / MAE."))
    class_weight: Optional[Union[bool, Literal["balanced", "sqrt"]]] = Field(None, **_key(
        "Class weights: false, true (= \"balanced\") or \"sqrt\"."))
    label_smoothing: Optional[Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(None, **_key("Label smoothing of the cross-entropy."))
    ordinal: Optional[bool] = Field(None, **_key("bins: CORAL cumulative outputs instead of a softmax (`--ordinal`)."))
    pool: Optional[Literal["avg", "max"]] = Field(None, **_key("Global pooling of a map tap inside the head."))
    age_head: Optional[Literal["expectation", "linear"]] = Field(None, **_key(
        "age: a softmax over whole years whose expectation is the prediction, or one linear unit."))
    age_sigma: Optional[Annotated[float, Field(ge=0.0)]] = Field(None, **_key(
        "age: width in years of the Gaussian soft target; bins: > 0 trains on soft bin targets.",
        shown="2 for age, 0 for bins"))
    age_transform: Optional[Literal["z", "log1p"]] = Field(None, **_key("age_head = \"linear\": the target's scale."))
    age_loss: Optional[Literal["mae", "mse", "huber"]] = Field(None, **_key("age_head = \"linear\": the loss."))
    val_share: Optional[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(None, **_key(
        "fold: the share of the training folds' groups held out for validation."))
    memory_mb: Optional[Annotated[float, Field(gt=0.0)]] = Field(None, **_key(
        "Memory budget in MiB for the train rows (read at once when they fit, else streamed) (`--memory-mb`)."))
    ranges: Optional[str] = Field(None, **_key(
        "Faces labelled with an age range (Adience's \"(25, 32)\") that the target cannot use (5 or 7 groups, "
        "age in years) stop the run, naming the count, unless `ranges = \"drop\"` leaves them out (counted in "
        "config.json and the report) (`--ranges`).", shown="stop, naming the count"))


class Margins(_Section):
    """Equivalence margins of the paired tests against the chosen input, an inline table
    (`margins = { accuracy = 0.02, mae = 0.25 }`)."""

    accuracy: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(0.01, **_key("Accuracy, as a share (0.01 = 1 point)."))
    one_off: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(0.01, **_key("1-off accuracy of age groups, as a share."))
    cs5: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(0.01, **_key("CS@5 (share of ages within 5 years)."))
    mae: Annotated[float, Field(gt=0.0)] = Field(0.15, **_key("Age MAE, in years."))


class Compare(_Section):
    """How the head inputs are compared (`featlab compare`)."""

    margins: Margins = Field(default_factory=Margins, **_key(
        "A difference to the chosen input within its margin is `equivalent` when two one-sided tests show it, "
        "`worse, within margin` (or `better, ...`) when the paired test also resolves it "
        "(`compare --margin METRIC=VALUE`).", shown="1 point of accuracy, 1-off, CS@5; 0.15 years of MAE"))


class Cnn(_Section):
    """A network trained from pixels on the same manifest and split, for every target of the `[[heads]]`
    (`featlab train-cnn`): the seed papers' reference row beside the heads in every comparison."""

    arch: str = Field("levi-hassner", **_key(
        "`levi-hassner` (Levi & Hassner 2015) or a keras.applications architecture built with weights=None "
        "(`MobileNetV2`, `VGG16`, ...) (`--arch`)."))
    size: Annotated[int, Field(ge=32)] = Field(227, **_key(
        "Crop side in pixels; chips are cut at 256/227 of it (`--size`; 63 at least for levi-hassner)."))
    epochs: Annotated[int, Field(ge=1)] = Field(60, **_key("Most epochs; early stopping on val ends sooner."))
    patience: Annotated[int, Field(ge=1)] = Field(8, **_key("Epochs without a better val loss before stopping."))
    batch_size: Annotated[int, Field(ge=1)] = Field(64, **_key("Faces per training step."))
    lr: Annotated[float, Field(gt=0.0)] = Field(1e-3, **_key("Adam learning rate, halved when the val loss stalls."))
    predict: Literal["center", "10crop"] = Field("center", **_key(
        "Prediction from the centre crop, or the mean over 10 crops (corners and centre, mirrored)."))
    chips_from: str = Field("dlib-rec", **_key("The backbone whose chips (geometry, preprocessing) the CNN reads."))


class Spec(_Section):
    """The top level of a spec: the study's name, its seed, fusion heads, then the sections."""

    name: Optional[str] = Field(None, **_key("The study's name (the report's title).", shown="the file's stem"))
    seed: Annotated[int, Field(ge=0)] = Field(0, **_key("Seed of the prepared split and of every head."))
    fusion: list[str] = Field(default_factory=list, **_key(
        "Heads that read several extracted taps at once, each a `+`-joined list of `taps` keys "
        "(`\"res12+res14+embedding\"`), trained and compared beside the single taps.", shown="`[]`"))
    progress: bool = Field(True, **_key("Show extraction progress."))
    zero_shot: bool = Field(True, **_key("Score dlib-age / dlib-gender's own outputs on the same faces beside the heads."))
    cross_fusion: Literal["none", "best"] = Field("none", **_key(
        "With `[[networks]]`: `\"best\"` fuses, per target, the inputs each network chose on validation (every "
        "combination of two or more networks, joined by image id) and names the best on validation."))
    similarity: bool = Field(False, **_key(
        "With `[[networks]]`: the linear CKA map between every tap of the first two networks (`featlab similarity`)."))
    dataset: Dataset = Field(..., **_key("[dataset] section."))
    backbone: Optional[Backbone] = Field(None, **_key("[backbone] section (or `[[networks]]`).",
                                                      shown="required unless `[[networks]]`"))
    networks: Optional[list[Network]] = Field(None, **_key("[[networks]] tables: two or more networks instead of "
                                                           "`[backbone]`.", shown="none"))
    extract: Extract = Field(default_factory=Extract, **_key("[extract] section.", shown="every key's default"))
    heads: Annotated[list[Head], Field(min_length=1)] = Field(..., **_key("[[heads]] tables."))
    compare: Compare = Field(default_factory=Compare, **_key("[compare] section.", shown="every key's default"))
    cnn: Optional[Cnn] = Field(None, **_key("[cnn] section: a network trained from pixels as a reference row.",
                                            shown="none"))


SECTIONS = {"dataset": Dataset, "backbone": Backbone, "networks": Network, "extract": Extract, "heads": Head,
            "compare": Compare, "cnn": Cnn}


# ----------------------------------------------------------------------------- validation
def _models_in(annotation) -> list[type[BaseModel]]:
    """The BaseModel classes an annotation holds (through Optional, list, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _walk(loc: tuple) -> tuple[type[BaseModel], list[str], str | None]:
    """Follow an error location through the models: (the model holding the last key reached, the readable path
    of the keys, the key at which the location leaves the models, if it does)."""
    model, path = Spec, []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path[-1] = f"{path[-1]}[{part}]"
            continue
        if part not in model.model_fields:
            return model, path, part
        inner = _models_in(model.model_fields[part].annotation)
        path.append(part)
        if not inner or i == len(loc) - 1:
            return model, path, None
        model = inner[0]
    return model, path, None


def nearest(key: str, valid) -> str:
    """``; did you mean 'x'?`` for the closest of ``valid``, else the list of valid keys."""
    valid = list(valid)
    return did_you_mean(key, valid, n=1, cutoff=0.5).strip() or "valid keys: " + ", ".join(valid)


def _where(path: list[str]) -> str:
    if not path:
        return "the spec's top level"
    if path[0].startswith("heads"):
        n = path[0][len("heads["):-1]
        head = f"[[heads]] #{int(n) + 1}" if n else "[[heads]]"
        return " ".join([head, *path[1:]])
    return f"[{'.'.join(path)}]"


def _describe(annotation) -> str:
    """A field's type in words (for the reference and for errors)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _describe(args[0])
    if origin in (Union, types.UnionType):
        args = [a for a in args if a is not type(None)]
        if len(args) == 2 and typing.get_origin(args[1]) is list and typing.get_args(args[1])[0] == args[0]:
            return f"{_describe(args[0])}, or a list of them"
        return " or ".join(dict.fromkeys(_describe(a) for a in args))
    if origin is Literal:
        values = [f'"{a}"' if isinstance(a, str) else str(a) for a in args]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if origin is list:
        return f"list of ({_describe(args[0])})" if typing.get_origin(args[0]) in (Union, Literal) else \
            f"list of {_describe(args[0])}s"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(annotation, str(annotation))


def _message(e: dict) -> str:
    loc, kind = tuple(e["loc"]), e["type"]
    model, path, unknown = _walk(loc)
    if kind == "extra_forbidden" or unknown is not None:
        key = unknown if unknown is not None else str(loc[-1])
        if not path and isinstance(e.get("input"), dict):
            return f"unknown section [{key}]; " + nearest(key, SECTIONS).replace("'", "[", 1).replace("'", "]", 1)
        if not path:
            return f"unknown top-level key {key!r}; " + nearest(key, model.model_fields)
        return f"{_where(path)}: unknown key {key!r}; " + nearest(key, model.model_fields)
    name = path[-1].split("[")[0] if path else ""
    field = model.model_fields.get(name)
    if kind == "missing":
        if field is not None and _models_in(field.annotation):
            return f"the spec has no [{'[heads]' if name == 'heads' else name}]" + (" table" if name == "heads" else " section")
        return f"{_where(path[:-1])}: {name} is required"
    shown = repr(e.get("input"))
    want = _describe(field.annotation) if field is not None else "valid"
    if name == "heads" and isinstance(e.get("input"), dict):
        return "heads must be a list of tables: write [[heads]] (double brackets) before each head, not [heads]"
    if kind == "string_pattern_mismatch":
        return f"{_where(path[:-1])}: {name} = {shown} must be avg, max, avgN or maxN (an NxN grid)"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short"):
        why = e["msg"][0].lower() + e["msg"][1:]
        return f"{_where(path[:-1])}: {name} = {shown}: {why}"
    if field is not None and _models_in(field.annotation) and not isinstance(e.get("input"), (dict, list)):
        return f"{name} must be a [{name}] section, not {shown}"
    hint = ""
    if kind == "literal_error" and isinstance(e.get("input"), str):
        options = [a for a in typing.get_args(e.get("ctx", {}) and _literal_of(field.annotation))]
        close = difflib.get_close_matches(e["input"], [str(o) for o in options], n=1, cutoff=0.5)
        hint = ("; a number is written without quotes" if close and close[0] == e["input"]
                else f"; did you mean {close[0]!r}?" if close else "")
    return f"{_where(path[:-1])}: {name} = {shown} must be {want}{hint}"


def _literal_of(annotation):
    """The first Literal inside an annotation (through Optional, Annotated, Union)."""
    if typing.get_origin(annotation) is Literal:
        return annotation
    for a in typing.get_args(annotation):
        found = _literal_of(a)
        if found is not None:
            return found
    return None


def validate(spec: dict, where: str = "spec") -> dict:
    """Check a loaded spec against :class:`Spec` (and the adapter options against the adapter); raise one
    line naming the first problem and the nearest valid key. Returns the spec unchanged."""
    data = {k: v for k, v in spec.items() if not k.startswith("_")}
    if isinstance(data.get("dataset"), dict) and "name" in data["dataset"]:
        raise FeatlabError(f"{where}: [dataset] has no key 'name': the study's files are named by the spec's "
                           "top-level name (features/manifests/NAME.csv, results/BACKBONE/NAME/); the adapter is "
                           "[dataset] adapter")
    try:
        model = Spec.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        # an unknown key first: a typo ('nam') also makes a required key ('name') missing. A value that fits none
        # of a union's types yields one error per type: the first says it.
        first = min(errors, key=lambda e: e["type"] != "extra_forbidden")
        raise FeatlabError(f"{where}: {_message(first)}") from None
    adapter = model.dataset.adapter
    for key in (spec["dataset"].get("options") or {}):
        only = (Options.model_fields[key].json_schema_extra or {}).get("adapters")
        if only and adapter not in only:
            raise FeatlabError(f"{where}: [dataset] options.{key} is an option of adapter {', '.join(only)} only, "
                               f"not of {adapter or 'a manifest'}")
    if (model.backbone is None) == (model.networks is None):
        raise FeatlabError(f"{where}: give either [backbone] (one network) or [[networks]] (several), "
                           + ("not both" if model.backbone is not None else "neither is there"))
    if model.networks is not None:
        if len(model.networks) < 2:
            raise FeatlabError(f"{where}: [[networks]] lists {len(model.networks)} network; give two or more "
                               "(or one [backbone])")
        if spec.get("extract", {}).get("out"):
            raise FeatlabError(f"{where}: [extract] out names one features file; with [[networks]] each network "
                               "gets its own (features/BACKBONE/NAME[-PREPROCESSING].h5)")
        seen = [(n.name, n.preprocessing) for n in model.networks]
        dup = next((x for x in seen if seen.count(x) > 1), None)
        if dup:
            raise FeatlabError(f"{where}: [[networks]] lists {dup[0]}"
                               + (f" with preprocessing {dup[1]!r}" if dup[1] else "") + " twice")
        shared = [n.name for n in model.networks if [x for x, _ in seen].count(n.name) > 1 and not n.preprocessing]
        if shared:
            raise FeatlabError(f"{where}: [[networks]] lists {shared[0]} more than once: give each its preprocessing")
    elif model.cross_fusion != "none" or model.similarity:
        raise FeatlabError(f"{where}: cross_fusion and similarity compare several networks: list them as [[networks]]")
    if not (model.dataset.manifest or model.dataset.adapter):
        raise FeatlabError(f"{where}: [dataset] needs an adapter (`featlab prepare --list`) or a manifest")
    return spec


def check_set_path(key: str) -> list[str]:
    """The parts of a ``--set section.key`` path, each a key of the schema (one line naming the nearest
    valid key otherwise)."""
    parts = key.strip().split(".")
    model: type[BaseModel] = Spec
    for i, p in enumerate(parts):
        here = ".".join(parts[:i])
        if p not in model.model_fields:
            valid = [f"{here}.{k}" if here else k for k in model.model_fields]
            close = difflib.get_close_matches(".".join(parts[:i + 1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else "valid: " + ", ".join(valid)
            return _set_error(key, f"{'[' + here + ']' if here else 'the spec'} has no key {p!r}; {hint}")
        inner = _models_in(model.model_fields[p].annotation)
        if p in ("heads", "networks"):
            return _set_error(key, f"[[{p}]] is a list of tables: edit the spec's [[{p}]] instead")
        if i < len(parts) - 1:
            if not inner:
                return _set_error(key, f"{'.'.join(parts[:i + 1])} is a value, not a section")
            model = inner[0]
    return parts


def _set_error(key: str, why: str):
    raise FeatlabError(f"--set {key}: {why}")


# ----------------------------------------------------------------------------- the reference
def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, (tuple, list)):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def _table(model: type[BaseModel], defaults: dict | None = None) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        extra = f.json_schema_extra or {}
        if "shown" in extra:
            default = extra["shown"]
        elif defaults is not None and name in defaults:
            default = _fmt(defaults[name]) or "none"
        elif f.is_required():
            default = "required"
        elif f.default_factory is not None:
            default = _fmt(f.default_factory())
        else:
            default = _fmt(f.default) or "none"
        desc = f.description or ""
        if extra.get("adapters"):
            desc += f" Adapter{'s' if len(extra['adapters']) > 1 else ''}: {', '.join(extra['adapters'])}."
        typ = _describe(f.annotation)
        lines.append(f"| `{name}` | {typ} | {default} | {desc} |")
    return lines


CSV_EXAMPLE = '''\
# my-study.toml: age and gender probes of dlib-rec's taps on a CSV of your own
#   featlab run my-study.toml           (re-run: finished steps are skipped)
name = "my-study"
seed = 0

[dataset]
adapter = "csv"
root = "/data/faces/labels.csv"     # the CSV (image paths relative to its folder)
options = { path_col = "file", age_col = "age_years", gender_col = "sex", group_col = "person" }

[backbone]
name = "dlib-rec"                   # offline; r100 needs model = "PATH/glintr100.onnx"

[extract]
taps = ["res12", "res14", "embedding"]

[[heads]]
target = "bins"
cats = [5, 7]

[[heads]]
target = "age"
epochs = 40

[[heads]]
target = "gender"
hidden = 0                          # a linear head
'''


def spec_reference() -> str:
    """The text of ``docs/spec.md``, generated from the schema (``featlab spec-doc``)."""
    from ..heads.train import default_hyperparameters

    hp = default_hyperparameters()
    hp = {k: v for k, v in hp.items() if k not in NOT_HEAD_KEYS and k not in ("input_dropout", "age_sigma")}
    out = [
        "# Experiment specs",
        "",
        "<!-- generated from featlab/study/schema.py by `featlab spec-doc > docs/spec.md`; do not edit by hand -->",
        "",
        "A spec is a TOML file that describes a whole study; `featlab run SPEC` does every step (prepare -> "
        "extract -> train-head + evaluate -> compare) and writes `results/BACKBONE/DATASET/report.md`. "
        "A finished step is skipped on a re-run. `--set section.key=VALUE` overrides one value "
        "(`--set dataset.root=/data/UTKFace`, `--set extract.taps='[\"res14\"]'`; VALUE is read as TOML, "
        "else as a string).",
        "",
        "Every key is checked before any work: an unknown section or key, a value of the wrong type or out of "
        "range, and a `--set` path that does not exist stop with one line naming the nearest valid key. "
        "The shipped specs are in `experiments/` and `featlab/experiments/demo.toml`.",
        "",
        "## A study on your own CSV",
        "",
        "The `csv` adapter reads any table with a column of image paths and a column of ages and/or genders "
        "(the delimiter `,`, `;` or tab is sniffed; column names match exactly, else ignoring case). "
        "The images should be face crops, or set `align = true` under `[extract]`.",
        "",
        "```toml",
        CSV_EXAMPLE.rstrip("\n"),
        "```",
        "",
        "## Top level",
        "",
        *_table(Spec),
        "",
    ]
    for title, model, defaults in (("[dataset]", Dataset, None), ("[dataset.options]", Options, None),
                                   ("[backbone]", Backbone, None), ("[[networks]]", Network, None),
                                   ("[extract]", Extract, None),
                                   ("[[heads]]", Head, hp), ("[compare]", Compare, None),
                                   ("[compare.margins]", Margins, None)):
        out += [f"## {title}", "", " ".join((model.__doc__ or "").split()), "", *_table(model, defaults), ""]
    return "\n".join(out)
