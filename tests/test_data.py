import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from tasks import data

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data')
CIFAR_NPZ = os.path.join(SHARED, 'cifar10', 'derived', 'cifar10_batch_prefixes_subset.npz')
fashion_present = os.path.isfile(os.path.join(data.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz'))


@pytest.mark.skipif(not fashion_present, reason=f'Fashion-MNIST not installed in {data.FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)')
def test_fashion_mnist_complete():
    train, test = data.load_fashion_mnist(split='train'), data.load_fashion_mnist(split='test')
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert train.content_hash() == data.load_fashion_mnist(split='train').content_hash()


def test_pad_and_resize():
    ds = data.ImageDataset(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8), torch.zeros(5, dtype=torch.long), 'x')
    padded = data.prepare(ds, pad_to_32=True)
    assert padded.images.shape == (5, 1, 32, 32) and int(padded.images[:, :, :2].max()) == 0
    assert torch.equal(padded.images[:, :, 2:30, 2:30], ds.images)
    small = data.prepare(ds, pad_to_32=True, resolution=16)
    expected = torch.nn.functional.avg_pool2d(padded.images.float(), 2).round().to(torch.uint8)
    assert torch.equal(small.images, expected)
    assert data.prepare(ds, resolution=20).images.shape == (5, 1, 20, 20)
    with pytest.raises(ValueError, match='28x28'):
        data.prepare(small, pad_to_32=True)


def test_model_range_round_trip():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = data.to_model_range(u)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.equal(data.to_uint8(x), u)


def _write_idx(path, array, compress=True):
    header = bytes([0, 0, 8, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, 'wb') as f:
        f.write(raw)


def test_idx_loader_and_errors(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (7, 28, 28))
    _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', imgs)
    _write_idx(tmp_path / 'train-labels-idx1-ubyte', np.arange(7), compress=False)
    ds = data.load_mnist(str(tmp_path), 'train')
    assert ds.images.shape == (7, 1, 28, 28) and torch.equal(ds.images[:, 0], torch.from_numpy(imgs.astype(np.uint8)))

    # Truncated: the error names the file and says what is wrong.
    raw = gzip.decompress((tmp_path / 'train-images-idx3-ubyte.gz').read_bytes())
    (tmp_path / 'train-images-idx3-ubyte.gz').write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(data.DataError, match='train-images-idx3-ubyte.gz: truncated'):
        data.load_mnist(str(tmp_path), 'train')
    (tmp_path / 'train-images-idx3-ubyte.gz').write_bytes(gzip.compress(raw)[:500])
    with pytest.raises(data.DataError, match='train-images-idx3-ubyte.gz: cannot read or decompress'):
        data.load_mnist(str(tmp_path), 'train')
    with pytest.raises(data.DataError, match=r't10k-images-idx3-ubyte\[.gz\] not found'):
        data.load_mnist(str(tmp_path), 'test')


def test_missing_directory_says_where_and_how():
    with pytest.raises(data.DataError, match='/nonexistent/fm does not exist.*apt-get install dataset-fashion-mnist'):
        data.load_fashion_mnist('/nonexistent/fm')
    with pytest.raises(data.DataError, match='cifar-10-batches-py'):
        data.load_cifar10('/nonexistent/cifar')
    with pytest.raises(ValueError, match='fashion-mnist, mnist, cifar10'):
        data.load_dataset('imagenet')


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        batches[name] = (rng.integers(0, 256, (4, 3072), dtype=np.uint8), list(rng.integers(0, 10, 4)))
        with open(tmp_path / name, 'wb') as f:
            pickle.dump({b'data': batches[name][0], b'labels': batches[name][1]}, f)
    ds = data.load_cifar10(str(tmp_path), 'train')
    assert ds.images.shape == (20, 3, 32, 32)
    # Row layout R(1024) G(1024) B(1024), row-major 32x32.
    assert int(ds.images[0, 1, 0, 5]) == int(batches['data_batch_1'][0][0, 1024 + 5])
    assert data.load_cifar10(str(tmp_path), 'test').labels.tolist() == [int(v) for v in batches['test_batch'][1]]
    (tmp_path / 'data_batch_3').write_bytes((tmp_path / 'data_batch_3').read_bytes()[:1000])
    with pytest.raises(data.DataError, match='data_batch_3: cannot unpickle'):
        data.load_cifar10(str(tmp_path), 'train')


@pytest.mark.skipif(not os.path.isfile(CIFAR_NPZ), reason='../shared/data is not beside this checkout (a user clone has none)')
def test_cifar10_shared_subset():
    ds = data.load_cifar10_npz(CIFAR_NPZ, 'train')
    assert ds.images.shape == (5085, 3, 32, 32)
    with np.load(CIFAR_NPZ) as f:
        assert ds.labels[:1017].tolist() == f['labels_full_data_batch_1'][:1017].tolist()


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, 'mnist')), reason='../shared/data is not beside this checkout')
def test_mnist_shared_test_split():
    ds = data.load_mnist(os.path.join(SHARED, 'mnist'), 'test')
    assert ds.images.shape == (10000, 1, 28, 28) and torch.bincount(ds.labels)[1] == 1135
    with pytest.raises(data.DataError, match='train-images-idx3-ubyte'):
        data.load_mnist(os.path.join(SHARED, 'mnist'), 'train')


def test_image_folder(tmp_path):
    import PIL.Image
    rng = np.random.default_rng(0)
    for cls in ('cats', 'dogs'):
        os.makedirs(tmp_path / cls)
        for i in range(3):
            PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / cls / f'{i}.png')
    ds = data.load_image_folder(str(tmp_path))
    assert ds.images.shape == (6, 3, 8, 8) and ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.num_classes == 2
    PIL.Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / 'dogs' / 'odd.png')
    with pytest.raises(data.DataError, match='odd.png is .9, 9, 3.*all images must match'):
        data.load_image_folder(str(tmp_path))


def test_save_image_grid(tmp_path):
    import PIL.Image
    imgs = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    data.save_image_grid(imgs, tmp_path / 'g.png', nrow=3, upscale=2)
    arr = np.asarray(PIL.Image.open(tmp_path / 'g.png'))
    assert arr.shape == (16, 24)
    assert np.array_equal(arr[8:16:2, 4 * 2 * 2:4 * 2 * 3:2], imgs[5, 0].numpy())


def test_partitions_are_deterministic_and_cover_everything():
    chunks = data.partition(103, 10)
    assert len(chunks) == 11 and chunks[3] == range(30, 40) and chunks[-1] == range(100, 103)
    assert sorted(i for c in chunks for i in c) == list(range(103))
    for workers in (1, 3, 8, 20):
        groups = data.assign_chunks(len(chunks), workers)
        assert sorted(c for g in groups for c in g) == list(range(len(chunks)))
    with pytest.raises(ValueError, match='chunk_size'):
        data.partition(10, 0)
