"""ImgMed: medical image preprocessing (the thesis' Listing 3.1 workflow and more)."""

from segscale.imgmed.augment import PRESETS, augment_store
from segscale.imgmed.convert import convert, export_slices, stack_pictures
from segscale.imgmed.io import Image, load, save, to_uint8
from segscale.imgmed.pipeline import Pipeline
from segscale.imgmed.prepare import prepare, split_cases
from segscale.imgmed.store import Store
from segscale.imgmed.transforms import Preprocessing, preprocess

__all__ = [
    "PRESETS",
    "Image",
    "Pipeline",
    "Preprocessing",
    "Store",
    "augment_store",
    "convert",
    "export_slices",
    "load",
    "prepare",
    "preprocess",
    "save",
    "split_cases",
    "stack_pictures",
    "to_uint8",
]
