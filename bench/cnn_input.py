"""The input pipeline of featlab train-cnn: an epoch's crops from the chip cache against decoding every image.

On real UTKFace faces (``../shared/data/utkface-dev``; ``--n`` of them):

1. **bare decode**: JPEG decode + the dlib-rec chip cut (landmarks, template warp) of each image, one process:
   what an epoch would cost per image without the cache (featlab cuts the cache in worker processes once);
2. **cut the cache**: :func:`featlab.features.pixels.load_chips` from nothing (worker processes);
3. **an epoch from the cache**: every train batch of :mod:`featlab.heads.cnntrain` (a permutation, random crops,
   mirrors, float32) read from the memory-mapped chips, without the network.

The ratio (3) / (1) is what the cache buys per epoch; the network's own rate on 2 cores is in the training logs
(config.json ``training``), reported beside it.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None):
    ap = C.parser(__doc__)
    ap.add_argument("--n", type=int, default=1000, help="real images [1000]")
    ap.add_argument("--size", type=int, default=64, help="crop side in pixels [64]")
    args = ap.parse_args(argv)
    tiny = C.tiny(args, n=48)
    load0 = C.load()
    import numpy as np

    from featlab.data.faces import prepare
    from featlab.features.pixels import chip_geometry, full_side, load_chips
    from featlab.heads.cnntrain import _batches
    from featlab.heads.keras_env import keras

    man = C.sub_manifest(args.n)
    import pandas as pd

    paths = pd.read_csv(man)["path"].tolist()
    side = full_side(args.size)
    geom = chip_geometry("dlib-rec", None, side)[0]
    t = time.perf_counter()
    for p in paths:
        prepare(p, geom, False)
    decode = len(paths) / (time.perf_counter() - t)

    root = C.workdir() / "pixels-bench"
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    chips = load_chips(man, "dlib-rec", None, side, root=root, verbose=False)
    cut = len(chips.rows) / (time.perf_counter() - t)

    k = keras()
    rows = np.arange(len(chips.rows))
    y = np.zeros((len(rows), 2), dtype=np.float32)
    data = _batches(k, chips.chips, rows, y, args.size, 64, 0, 0)
    t = time.perf_counter()
    n = 0
    for i in range(len(data)):
        x, _ = data[i]
        n += len(x)
    epoch = n / (time.perf_counter() - t)
    table = C.md_table(["step", "faces/s", "vs bare decode"], [
        ["bare decode + chip cut, 1 process", decode, "1.00x"],
        ["cut the cache once (worker processes)", cut, f"{cut / decode:.2f}x"],
        [f"an epoch's {args.size}px crops from the cache", epoch, f"{epoch / decode:.0f}x"],
    ])
    print(table)
    print(f"cache: {chips.path} ({chips.chips.nbytes / 2**20:.1f} MiB for {len(chips.rows)} faces at {side}px)")
    C.record(f"train-cnn input pipeline ({args.n} faces, {args.size}px crops)", sys.argv, table,
             "The network itself trained at 73-84 faces/s at 64 px and 45 at 112 on these 2 cores (levi-hassner, "
             "batch 64; from the training runs): the cached pipeline is never what an epoch waits for.",
             load_before=load0, enabled=not tiny and not args.no_record)


if __name__ == "__main__":
    main()
