"""Reading images, with errors that name the file and the fix."""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from vislens.errors import ImageError


def _open(path: str):
    if "://" in path:
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def load_image(path: str) -> Image.Image:
    """Decode an image fully, as RGB.

    Raises
    ------
    ImageError
        If the file is missing or cannot be decoded.
    """
    try:
        with _open(path) as handle:
            image = Image.open(handle)
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist; fix the path in the data set or remove the record") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image {path} cannot be decoded ({exc}); replace the file or remove the record") from None


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file header, or None if it cannot be read."""
    try:
        with _open(path) as handle:
            return Image.open(handle).size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None
