"""Load the evaluation data shipped in models/ and apply each model's preprocessing."""

import gzip
import pathlib
import struct

import numpy as np
from PIL import Image

MODELS_DIR = pathlib.Path(__file__).resolve().parent
MNIST_DIR = MODELS_DIR / "mnist"
IMAGENET_IMAGES_DIR = MODELS_DIR / "efficientnet-lite0" / "images"

# IDX element type codes (third byte of the magic number) -> big-endian NumPy dtype.
IDX_DTYPES = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

EFFICIENTNET_INPUT_SIZE = (224, 224)


def read_idx(path):
    """Read a gzip-compressed IDX file (the MNIST container format) into a NumPy array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack_from(">HBB", data, 0)
    if zero != 0 or dtype_code not in IDX_DTYPES:
        raise ValueError(f"{path}: invalid IDX header {data[:4].hex()}")
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=IDX_DTYPES[dtype_code], offset=offset)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header shape {shape} does not match {array.size} elements")
    return array.reshape(shape)


def load_mnist_test():
    """Return the 10,000 MNIST test images as float32 [N,1,28,28] in [0,1] and int64 labels [N]."""
    images = read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    pixels = images.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return pixels, labels.astype(np.int64)


def imagenet_image_paths():
    """Return the shipped ImageNet photos in sorted filename order."""
    paths = sorted(IMAGENET_IMAGES_DIR.glob("imagenet_*.jpg"))
    if not paths:
        raise FileNotFoundError(
            f"no imagenet_*.jpg in {IMAGENET_IMAGES_DIR}; run python models/efficientnet-lite0/build.py")
    return paths


def imagenet_label_from_filename(path):
    """Return the class index encoded in a foolbox file name such as imagenet_00_243.jpg."""
    return int(pathlib.Path(path).stem.split("_")[-1])


def preprocess_efficientnet(path):
    """Decode a photo and return the EfficientNet-Lite0 input as float32 [1,3,224,224].

    Steps: decode to RGB, resize to 224x224 with Pillow's BILINEAR filter, round
    back to uint8 as Pillow does, scale to [-1,1] with x/127.5 - 1, and
    transpose HWC to NCHW. Pillow's BILINEAR is a triangle filter whose support
    widens when downscaling, so it also antialiases. The aspect ratio is not kept.
    """
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.size != EFFICIENTNET_INPUT_SIZE:
        rgb = rgb.resize(EFFICIENTNET_INPUT_SIZE, Image.BILINEAR)
    pixels = np.asarray(rgb, dtype=np.float32)
    scaled = pixels / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(scaled.transpose(2, 0, 1)[None])
