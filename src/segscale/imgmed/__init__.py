"""ImgMed: medical image preprocessing (the thesis' Listing 3.1 workflow and more)."""

from segscale.imgmed.prepare import prepare, split_cases
from segscale.imgmed.store import Store
from segscale.imgmed.transforms import Preprocessing, preprocess

__all__ = ["Preprocessing", "Store", "prepare", "preprocess", "split_cases"]
