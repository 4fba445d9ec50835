"""Real image data installed from Debian packages (scripts/install_data.sh): the demo's
Fashion-MNIST, and the photos the data benchmarks decode.

Fashion-MNIST (``dataset-fashion-mnist``) gives labelled 28x28 grayscale images; opencv-doc and the
wallpaper packages give real JPEG photos covering grayscale, progressive and 4:2:0 / 4:2:2 / 4:4:4
chroma subsampling.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from aim_megatron.data.shards import read_idx

INSTALL_HINT = "run scripts/install_data.sh (installs the Debian data packages)"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
OPENCV_EXAMPLES = Path("/usr/share/doc/opencv-doc/examples")
PHOTO_DIRS = [OPENCV_EXAMPLES, Path("/usr/share/backgrounds"), Path("/usr/share/wallpapers")]


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
