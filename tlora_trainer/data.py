"""Training data: which images with which captions (one image, a folder, or sd-scripts'
<repeats>_<class> folders), checked before any model loads; image tensors; and the order in
which the run draws them (a pure function of seed and position, so a resumed run sees the same)."""

import dataclasses
import os
import re
from typing import List, Optional

import numpy as np
import torch

from .errors import UsageError, describe_os_error, is_os_failure
from .fileio import describe_path, list_folder, read_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclasses.dataclass
class Sample:
    path: str
    caption: str
    repeats: int


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_in(folder: str) -> List[str]:
    """Image files of a folder; an entry with an image name that is not a file (a FIFO, a device,
    a broken link) is refused rather than skipped, so no image goes missing silently."""
    images = []
    for name in list_folder(folder, "data folder"):
        path = os.path.join(folder, name)
        if not _is_image_name(name):
            continue
        kind = describe_path(path)
        if kind == "a folder":
            continue
        if kind != "a file":
            raise UsageError(f"image {path} is {kind}, not an image file; remove it from the data folder")
        images.append(path)
    return images


def _caption_for(image: str, caption_extension: str, fallback: Optional[str]) -> str:
    caption_file = os.path.splitext(image)[0] + caption_extension
    if os.path.lexists(caption_file):
        text = read_text(caption_file, "caption file").strip()  # names the file if it is no UTF-8 text or no file
        if text:
            return text
    if fallback:
        return fallback
    raise UsageError(
        f"{image} has no caption: put one in {os.path.basename(caption_file)} (--caption_extension {caption_extension}), "
        f"or give --instance_prompt, or use a <repeats>_<class> folder"
    )


def collect_samples(train_data_dir: Optional[str], caption_extension: str, instance_prompt: Optional[str]) -> List[Sample]:
    """One image, a folder of images, or sd-scripts' <repeats>_<class tokens> folders."""
    if not train_data_dir:
        raise UsageError("no training data: give --train_data_dir (one image, a folder of images, or <repeats>_<class> folders)")
    kind = describe_path(train_data_dir)
    if kind == "missing":
        raise UsageError(f"train_data_dir {train_data_dir} does not exist; give an image file or a folder of images")
    if kind == "a file":
        if not _is_image_name(train_data_dir):
            raise UsageError(f"train_data_dir {train_data_dir} is a file but not an image ({', '.join(IMAGE_EXTENSIONS)})")
        return [Sample(train_data_dir, _caption_for(train_data_dir, caption_extension, instance_prompt), 1)]
    if kind != "a folder":
        raise UsageError(f"train_data_dir {train_data_dir} is {kind}; give an image file or a folder of images")
    samples = [Sample(p, _caption_for(p, caption_extension, instance_prompt), 1) for p in _images_in(train_data_dir)]
    for name in list_folder(train_data_dir, "data folder"):
        sub = os.path.join(train_data_dir, name)
        match = REPEAT_FOLDER.match(name)
        if not match or describe_path(sub) != "a folder":
            continue
        repeats, class_tokens = int(match.group(1)), match.group(2).replace("_", " ").strip()
        if repeats < 1:
            raise UsageError(f"{sub}: the repeat count in the folder name must be at least 1")
        for image in _images_in(sub):
            samples.append(Sample(image, _caption_for(image, caption_extension, instance_prompt or class_tokens), repeats))
    if not samples:
        raise UsageError(
            f"train_data_dir {train_data_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no sd-scripts "
            f"<repeats>_<class> folders (e.g. 10_sks dog/) with images; add images or point at the right folder"
        )
    return samples


def check_images(samples: List[Sample]) -> None:
    """Decode every image once, so a broken one stops the run before any model loads."""
    from PIL import Image, UnidentifiedImageError

    for sample in samples:
        try:
            with Image.open(sample.path) as image:
                image.load()
                size = image.size
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
            if is_os_failure(e) and getattr(e, "errno", None) is not None:
                raise UsageError(f"image {describe_os_error(e, sample.path, 'read it')}") from None
            reason = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"image {sample.path} cannot be read ({reason}); replace or remove it") from None
        if min(size) < 8:
            raise UsageError(f"image {sample.path} is only {size[0]}x{size[1]} pixels; use images of at least 8x8")


def load_image_tensor(path: str, width: int, height: int) -> torch.Tensor:
    """RGB in [-1, 1], resized to cover width x height and centre-cropped (no augmentation)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def sample_index(position: int, count: int, seed: int) -> int:
    """Dataset index of the `position`-th sample drawn in the whole run (all processes): a fresh
    permutation every epoch, a pure function of (seed, position) so a resumed run sees the same data."""
    epoch, offset = divmod(position, count)
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    return int(torch.randperm(count, generator=generator)[offset])
