"""Training augmentation with MONAI transforms, plugged into segscale by path:

    data:
      transform: {name: examples/plugins/monai_augment.py:augment, kwargs: {prob: 0.5}}

(`pip install monai` first: segscale does not depend on it.)
"""

from monai.transforms import Compose, RandAffined, RandGaussianNoised

from segscale.imgmed.plugins import DictTransform


def augment(prob: float = 0.5, rotate_deg: float = 15.0, scale: float = 0.1) -> DictTransform:
    return DictTransform(
        Compose(
            [
                RandAffined(
                    keys=["image", "label"],
                    prob=prob,
                    rotate_range=rotate_deg * 3.14159265 / 180,
                    scale_range=scale,
                    mode=("bilinear", "nearest"),
                    padding_mode="zeros",
                ),
                RandGaussianNoised(keys=["image"], prob=prob, std=0.05),
            ]
        )
    )
