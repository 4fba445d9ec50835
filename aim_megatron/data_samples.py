"""Real image data installed from Debian packages (scripts/install_data.sh), for tests and benchmarks.

Fashion-MNIST (``dataset-fashion-mnist``) gives labelled 28x28 grayscale images; opencv-doc and the
wallpaper packages give real JPEG photos covering grayscale, progressive and 4:2:0 / 4:2:2 / 4:4:4
chroma subsampling.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from aim_megatron.data_shards import read_idx

INSTALL_HINT = "run scripts/install_data.sh (installs the Debian data packages)"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
OPENCV_EXAMPLES = Path("/usr/share/doc/opencv-doc/examples")
PHOTO_DIRS = [OPENCV_EXAMPLES, Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers")]

# Small real JPEGs per kind (PIL reports the kind; tests check it): (path under OPENCV_EXAMPLES, class).
REAL_JPEGS: dict[str, list[str]] = {
    "gray": ["data/left01.jpg", "data/right01.jpg", "data/ellipses.jpg", "text/scenetext_char01.jpg"],
    "progressive": ["data/Blender_Suzanne1.jpg", "data/ela_original.jpg", "text/scenetext_word04.jpg"],
    "422": ["data/baboon.jpg", "data/fruits.jpg", "text/scenetext06.jpg"],
    "444": ["alphamat/input_images/plant.jpg", "hfs/data/000.jpg", "data/starry_night.jpg"],
    "420": ["data/HappyFish.jpg", "data/butterfly.jpg", "data/messi5.jpg"],
}


def require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; {INSTALL_HINT}")
    return path


def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the 'train' (60k) or 'test' (10k) split."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(require(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(require(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"))
    return images, labels.astype(np.int64)


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


def real_photo_files() -> list[Path]:
    """Every distinct real JPEG photo the data packages install (about 140), sorted."""
    seen, files = set(), []
    for root in PHOTO_DIRS:
        for path in sorted(require(root).rglob("*")):
            if path.suffix.lower() in (".jpg", ".jpeg") and path.is_file() and not path.is_symlink():
                key = (path.stat().st_size, path.read_bytes()[:4096])
                if key not in seen:
                    seen.add(key)
                    files.append(path)
    return files
