"""Test fixtures made from the real images the Debian data packages install
(aim_megatron/data/local_datasets.py): one folder per JPEG kind, plus deliberately broken files."""
from __future__ import annotations

import shutil
from pathlib import Path

from aim_megatron.data.local_datasets import OPENCV_EXAMPLES, require

# Small real JPEGs per kind (PIL reports the kind; tests check it): (path under OPENCV_EXAMPLES, class).
REAL_JPEGS: dict[str, list[str]] = {
    "gray": ["data/left01.jpg", "data/right01.jpg", "data/ellipses.jpg", "text/scenetext_char01.jpg"],
    "progressive": ["data/Blender_Suzanne1.jpg", "data/ela_original.jpg", "text/scenetext_word04.jpg"],
    "422": ["data/baboon.jpg", "data/fruits.jpg", "text/scenetext06.jpg"],
    "444": ["alphamat/input_images/plant.jpg", "hfs/data/000.jpg", "data/starry_night.jpg"],
    "420": ["data/HappyFish.jpg", "data/butterfly.jpg", "data/messi5.jpg"],
}


def make_real_jpeg_folder(dst: str | Path, with_bad: bool = True) -> dict[str, list[Path]]:
    """An image folder with one class sub-folder per kind of real JPEG; with ``with_bad`` a
    ``bad/`` class holds a truncated JPEG, a text file named .jpg and an empty .jpg.
    Returns {"good": [...], "bad": [...], kind: [...]}."""
    dst = Path(dst)
    out: dict[str, list[Path]] = {"good": [], "bad": []}
    for kind, names in REAL_JPEGS.items():
        (dst / kind).mkdir(parents=True, exist_ok=True)
        out[kind] = []
        for name in names:
            target = dst / kind / name.replace("/", "_")
            shutil.copyfile(require(OPENCV_EXAMPLES / name), target)
            out[kind].append(target)
            out["good"].append(target)
    if with_bad:
        bad = dst / "bad"
        bad.mkdir(exist_ok=True)
        full = (OPENCV_EXAMPLES / REAL_JPEGS["422"][0]).read_bytes()
        (bad / "truncated.jpg").write_bytes(full[: len(full) // 3])
        (bad / "not_an_image.jpg").write_text("this is text, not a JPEG\n")
        (bad / "empty.jpg").write_bytes(b"")
        out["bad"] = [bad / "truncated.jpg", bad / "not_an_image.jpg", bad / "empty.jpg"]
    return out
