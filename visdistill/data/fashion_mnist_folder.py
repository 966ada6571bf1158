"""Fashion-MNIST written out as an image folder (``root/<class>/<image>.png``): a real
folder of encoded images to decode, for examples, benchmarks and tests that need one
without a download.
"""

from __future__ import annotations

from pathlib import Path

from .fashion_mnist import FashionMNISTDataModule


def write_fashion_mnist_folder(
    root: str | Path, count: int, *, train: bool = True, size: int = 64, start: int = 0
) -> Path:
    """Write Fashion-MNIST images ``start .. start + count - 1`` of the training (or, with
    ``train=False``, the test) split as ``size`` px RGB PNGs in class folders.

    Each 28 px image is padded to 32 px (as :class:`FashionMNISTDataModule` serves it),
    made RGB and resized to ``size`` px (bicubic). Files are ``root/<label>/<i:05d>.png``
    with the label ``0`` .. ``9`` (Fashion-MNIST's class index: the folder names sort in
    that order, so an :class:`~visdistill.ImageFolderDataModule` on ``root`` has the same
    class indices as the zoo's Fashion-MNIST teachers) and ``i`` the image's index in the
    split.

    Args:
        root: the folder to write into (created; existing files of the same name are
            overwritten, nothing else is touched).
        count: how many images.
        train: the training split (60k images), else the test split (10k).
        size: side of the written images in pixels.
        start: index of the first image in the split.

    Returns:
        ``root``.
    """
    from PIL import Image

    images, targets = FashionMNISTDataModule().load(train=train)  # (N, 1, 32, 32) uint8, (N,)
    if count < 1 or start < 0 or start + count > len(images):
        split = "training" if train else "test"
        raise ValueError(
            f"images {start}..{start + count - 1} are not all in Fashion-MNIST's {split} split "
            f"({len(images)} images); choose count >= 1 and start + count <= {len(images)}"
        )
    root = Path(root)
    for i in range(start, start + count):
        folder = root / str(int(targets[i]))
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(images[i, 0].numpy()).convert("RGB")
        image.resize((size, size), Image.BICUBIC).save(folder / f"{i:05d}.png")
    return root
