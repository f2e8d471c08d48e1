import pickle

import numpy as np
import pytest
import torch

from slimcnn.data import DataError, Loader, balanced_subset, cifar10_loaders, load_cifar10, load_demo


def test_image_folder_test_split(cifar_root):
    d = load_cifar10(cifar_root, "test")  # the embedded subset written as an image folder: 100 per class
    assert d.images.shape == (1000, 32, 32, 3) and d.images.dtype == torch.uint8
    assert torch.bincount(d.labels).tolist() == [100] * 10
    assert d.classes[0] == "airplane" and d.classes[9] == "truck"
    demo = load_demo("test")  # the same JPEG bytes, decoded from the package's npz
    order = torch.argsort(demo.labels, stable=True)
    assert torch.equal(d.images, demo.images[order]) and torch.equal(d.labels, demo.labels[order])


@pytest.mark.shared
def test_full_image_folder_test_split():
    from conftest import FULL_CIFAR

    d = load_cifar10(FULL_CIFAR, "test")
    assert d.images.shape == (10000, 32, 32, 3) and d.images.dtype == torch.uint8
    assert torch.bincount(d.labels).tolist() == [1000] * 10
    assert d.classes[0] == "airplane" and d.classes[9] == "truck"


def test_pickle_layout(tmp_path, cifar_root):
    src = load_cifar10(cifar_root, "test")
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name, sl in [(f"data_batch_{i}", slice(i * 10, i * 10 + 10)) for i in range(1, 6)] + [("test_batch", slice(0, 20))]:
        data = src.images[sl].permute(0, 3, 1, 2).reshape(-1, 3072).numpy()
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, "labels": src.labels[sl].tolist()}, f)
    t = load_cifar10(tmp_path, "test")
    assert torch.equal(t.images, src.images[:20]) and torch.equal(t.labels, src.labels[:20])
    assert len(load_cifar10(tmp_path, "train")) == 50


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    with pytest.raises(DataError, match="neither"):
        load_cifar10(tmp_path)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_cifar10(tmp_path, use_cache=False)
    (tmp_path / "train" / "cat" / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode"):
        load_cifar10(tmp_path, use_cache=False)


def test_balanced_subset_is_fixed_and_balanced():
    labels = torch.arange(1000) % 10
    a, b = balanced_subset(labels, 105, seed=3), balanced_subset(labels, 105, seed=3)
    assert torch.equal(a, b) and len(a) == 105
    counts = torch.bincount(labels[a])
    assert counts.max() - counts.min() <= 1
    assert not torch.equal(a, balanced_subset(labels, 105, seed=4))


def test_loader_augmentation_and_determinism(cifar_root):
    loaders = cifar10_loaders(cifar_root, batch_size=32, train_limit=64, test_limit=40)
    tr = loaders["train"]
    tr.set_epoch(1)
    x1 = [x for x, _ in tr]
    tr.set_epoch(1)
    x2 = [x for x, _ in tr]
    assert all(torch.equal(a, b) for a, b in zip(x1, x2)) and x1[0].shape == (32, 3, 32, 32)
    tr.set_epoch(2)
    assert not torch.equal(next(iter(tr))[0], x1[0])
    xs, ys = zip(*loaders["test"])
    assert sum(len(y) for y in ys) == 40
    # normalisation: identity images map back exactly
    data = load_cifar10(cifar_root, "test").subset(range(4))
    x, _ = next(iter(Loader(data, 4, mean=(0, 0, 0), std=(1, 1, 1))))
    assert torch.allclose(x * 255, data.images.permute(0, 3, 1, 2).float())


def test_loader_shards_ranks_disjointly():
    from slimcnn.data import ImageSet

    d = ImageSet(torch.zeros(10, 32, 32, 3, dtype=torch.uint8), torch.arange(10), ["c"])
    seen = [torch.cat([y for _, y in Loader(d, 3, shuffle=True, rank=r, world_size=2)]) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 5 and set(seen[0].tolist()).isdisjoint(seen[1].tolist())


def test_embedded_demo_subset():
    d = load_demo("test")
    assert len(d) == 1000 and torch.bincount(d.labels).tolist() == [100] * 10
    assert np.asarray(d.images).mean() > 50
