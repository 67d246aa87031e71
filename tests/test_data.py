import pytest
import torch

from segscale.config import AugmentConfig
from segscale.data import ShardSampler, SliceDataset
from segscale.imgmed import Store
from segscale.imgmed.augment import BatchAugment


def test_shards_cover_every_sample_once_for_any_world_size():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            seen = [i for r in range(world) for i in ShardSampler(n, r, world)]
            assert sorted(seen) == list(range(n))


def shapes(n: int = 4, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy - 20) ** 2 / 100 + (xx - 26) ** 2 / 49 < 1).long()  # an off-centre ellipse
    return mask[None, None].float().repeat(n, 1, 1, 1), mask[None].repeat(n, 1, 1)


def test_augmentation_moves_image_and_mask_together():
    image, mask = shapes()
    aug = BatchAugment(
        AugmentConfig(enabled=True, rotation=45, zoom=(0.8, 1.2), translation=0.1, flip=True)
    )
    x, y = aug(image, mask, torch.Generator().manual_seed(0))
    assert not torch.equal(y, mask)  # it did move
    agree = ((x[:, 0] > 0.5).long() == y).float().mean()
    assert agree > 0.98  # the bilinear image and the nearest mask differ only on the boundary
    assert set(torch.unique(y).tolist()) <= {0, 1}


def test_augmentation_is_seeded():
    image, mask = shapes()
    aug = BatchAugment(AugmentConfig(enabled=True, rotation=30, intensity=0.1))
    a = aug(image, mask, torch.Generator().manual_seed(5))
    b = aug(image, mask, torch.Generator().manual_seed(5))
    c = aug(image, mask, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_slice_dataset_reads_a_split(real_store):
    store = Store.open(real_store)
    ds = SliceDataset(store, "test")
    image, mask, case = ds[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert mask.dtype == torch.int64 and case == 0
    assert len(ds) == 12 * len(store.meta["splits"]["test"])


def test_a_damaged_or_incomplete_store_is_one_line(tmp_path, real_store):
    """numpy's own errors (FileNotFoundError, 'mmap length is greater than file size') were
    tracebacks of every command that opens a store."""
    import shutil

    from segscale.errors import DataError
    from segscale.imgmed.store import Store

    copy = tmp_path / "store"
    shutil.copytree(real_store, copy)
    (copy / "images.npy").write_bytes((real_store / "images.npy").read_bytes()[:1000])
    with pytest.raises(DataError, match=r"images.npy: damaged \(.*\); prepare the store again"):
        Store.open(copy)
    (copy / "masks.npy").unlink()
    shutil.copy(real_store / "images.npy", copy / "images.npy")
    with pytest.raises(DataError, match=r"masks.npy: missing; prepare the store again"):
        Store.open(copy)
    (copy / "meta.json").write_text("{")
    with pytest.raises(DataError, match=r"meta.json: unreadable"):
        Store.open(copy)
