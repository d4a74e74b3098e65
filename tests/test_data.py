import gzip
import os
import pickle
import re

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
    with pytest.raises(data.DataError, match=r'odd.png is 9x9, but .*cats/0.png is 8x8; all images must match'):
        data.load_image_folder(str(tmp_path))



def _folder_of(tmp_path, *images):
    """Save PIL images as 0.png, 1.png, ... (or the file name given with each) in a new folder."""
    root = tmp_path / 'imgs'
    root.mkdir()
    for i, img in enumerate(images):
        img, fname = img if isinstance(img, tuple) else (img, f'{i}.png')
        img.save(root / fname)
    return root


def _one_line_error(fn, *args):
    with pytest.raises(data.DataError) as e:
        fn(*args)
    assert '\n' not in str(e.value)
    return str(e.value)


def test_palette_images_load_as_their_colours(tmp_path):
    import PIL.Image
    rng = np.random.default_rng(1)
    root = _folder_of(tmp_path, *(PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert('P') for _ in range(2)))
    ds = data.load_image_folder(str(root))
    assert ds.images.shape == (2, 3, 16, 16) and ds.images.dtype == torch.uint8
    for i in range(2):
        with PIL.Image.open(root / f'{i}.png') as img:
            assert img.mode == 'P'
            expected = np.asarray(img.convert('RGB'))
        assert np.array_equal(ds.images[i].permute(1, 2, 0).numpy(), expected)
        assert len(np.unique(expected)) > 2  # colours, not a handful of palette indices


def test_alpha_and_bilevel_modes(tmp_path):
    import PIL.Image
    rng = np.random.default_rng(2)
    la = rng.integers(0, 256, (8, 8, 2), dtype=np.uint8)
    bits = rng.random((8, 8)) > 0.5
    root = _folder_of(tmp_path, PIL.Image.fromarray(la, 'LA'), PIL.Image.fromarray(bits))
    ds = data.load_image_folder(str(root))
    assert ds.images.shape == (2, 1, 8, 8)
    assert np.array_equal(ds.images[0, 0].numpy(), la[:, :, 0])
    assert set(np.unique(ds.images[1].numpy())) == {0, 255}
    assert np.array_equal(ds.images[1, 0].numpy(), np.where(bits, 255, 0))

    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # a fully transparent pixel keeps its colour
    PIL.Image.fromarray(rgba, 'RGBA').save(tmp_path / 'rgba.png')
    assert np.array_equal(data.decode_image(str(tmp_path / 'rgba.png'), 'rgba.png'), rgba[:, :, :3])


def test_sixteen_bit_greyscale_is_rounded_to_eight_bits(tmp_path):
    import PIL.Image
    k = np.arange(0, 255)
    values = np.concatenate([[0, 128, 129, 65535, 65406, 65407], 257 * k, 257 * k + 128, 257 * k + 129]).astype(np.uint16)
    values = np.resize(values, 32 * 32).reshape(32, 32)
    root = _folder_of(tmp_path, PIL.Image.fromarray(values))
    with PIL.Image.open(root / '0.png') as img:
        assert img.mode in ('I;16', 'I;16B', 'I;16L', 'I')  # Pillow 13 reads 16-bit greyscale PNGs as I;16
        assert np.array_equal(np.asarray(img), values)
    got = data.load_image_folder(str(root)).images[0, 0].numpy().astype(np.int64)
    assert np.array_equal(got, np.round(values / 257))
    flat = got.ravel()
    assert flat[:6].tolist() == [0, 0, 1, 255, 254, 255]  # 128 / 257 < 1/2 < 129 / 257; 65406 = 257 * 254 + 128
    n = len(k)
    assert np.array_equal(flat[6:6 + n], k) and np.array_equal(flat[6 + n:6 + 2 * n], k)
    assert np.array_equal(flat[6 + 2 * n:6 + 3 * n], k + 1)


def test_cmyk_and_ycbcr_convert_as_pil_does(tmp_path):
    import PIL.Image
    rgb = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    root = _folder_of(tmp_path, (rgb.convert('CMYK'), 'a.jpg'), (rgb.convert('CMYK'), 'b.tif'), (rgb.convert('YCbCr'), 'c.tif'))
    ds = data.load_image_folder(str(root))
    assert ds.images.shape == (3, 3, 8, 8)
    for i, fname in enumerate(('a.jpg', 'b.tif', 'c.tif')):
        with PIL.Image.open(root / fname) as img:
            assert img.mode == ('YCbCr' if fname == 'c.tif' else 'CMYK')
            assert np.array_equal(ds.images[i].permute(1, 2, 0).numpy(), np.asarray(img.convert('RGB')))
    assert np.array_equal(ds.images[1].permute(1, 2, 0).numpy(), np.asarray(rgb))  # TIFF is lossless


def test_grey_and_colour_together_become_rgb(tmp_path):
    import PIL.Image
    rng = np.random.default_rng(4)
    grey, colour = rng.integers(0, 256, (8, 8), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    ds = data.load_image_folder(str(_folder_of(tmp_path, PIL.Image.fromarray(grey), PIL.Image.fromarray(colour))))
    assert ds.images.shape == (2, 3, 8, 8)
    for c in range(3):
        assert np.array_equal(ds.images[0, c].numpy(), grey)
    assert np.array_equal(ds.images[1].permute(1, 2, 0).numpy(), colour)


def test_unfaithful_modes_and_bad_sizes_are_refused(tmp_path):
    import PIL.Image
    rng = np.random.default_rng(5)
    PIL.Image.fromarray(rng.random((8, 8)).astype(np.float32)).save(tmp_path / 'float.tif')
    with PIL.Image.open(tmp_path / 'float.tif') as img:
        assert img.mode == 'F'
    message = _one_line_error(data.load_image_folder, str(tmp_path))
    assert 'float.tif' in message and "mode 'F'" in message

    PIL.Image.fromarray(np.array([[70000, 1], [2, 3]], dtype=np.int32)).save(tmp_path / 'float.tif')  # 32-bit 'I'
    message = _one_line_error(data.load_image_folder, str(tmp_path))
    assert 'float.tif' in message and "mode 'I'" in message and '70000' in message

    os.remove(tmp_path / 'float.tif')
    PIL.Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / 'a.png')
    PIL.Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / 'b.png')
    message = _one_line_error(data.load_image_folder, str(tmp_path))
    assert re.search(r'b\.png is 16x16, but .*a\.png is 8x8', message)

    PIL.Image.fromarray(rng.integers(0, 256, (8, 12), dtype=np.uint8)).save(tmp_path / 'b.png')  # 12 wide, 8 high
    message = _one_line_error(data.load_image_folder, str(tmp_path))
    assert 'b.png is 12x8, not square' in message and 'data.transform: center-crop' in message

    (tmp_path / 'b.png').write_bytes(b'not a png')
    assert 'b.png: cannot decode' in _one_line_error(data.load_image_folder, str(tmp_path))


def _edm_dataset(tmp_path, labels=True):
    """Images and dataset.json as EDM's dataset_tool.py writes them, as a zip and as a folder,
    with one grey image among colour ones and names whose sort order differs from write order."""
    import io
    import json
    import zipfile
    import PIL.Image
    rng = np.random.default_rng(6)
    names = ['00000/img00000000.png', '00000/img00000001.png', '00001/img00001000.png', '00000/img00000002.jpeg']
    arrays = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in names]
    arrays[1] = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    meta = {'labels': [[n, int(c)] for n, c in zip(names, [6, 0, 3, 2])] if labels else None}
    folder = tmp_path / 'edm-folder'
    with zipfile.ZipFile(tmp_path / 'edm.zip', 'w', compression=zipfile.ZIP_STORED) as zf:
        for name, arr in zip(names, arrays):
            buf = io.BytesIO()
            PIL.Image.fromarray(arr).save(buf, format='png' if name.endswith('png') else 'jpeg', quality=95)
            zf.writestr(name, buf.getvalue())
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(buf.getvalue())
        zf.writestr('dataset.json', json.dumps(meta))
    (folder / 'dataset.json').write_text(json.dumps(meta))
    return tmp_path / 'edm.zip', folder, names, arrays, meta


def test_edm_dataset_zip_and_folder(tmp_path):
    import PIL.Image
    zip_path, folder, names, arrays, _ = _edm_dataset(tmp_path)
    from_zip, from_folder = data.load_edm_dataset(str(zip_path)), data.load_edm_dataset(str(folder))
    order = sorted(range(len(names)), key=lambda i: names[i])  # sorted by path: 0, 1, 2 (jpeg), then 00001/...
    assert [names[i] for i in order] == ['00000/img00000000.png', '00000/img00000001.png', '00000/img00000002.jpeg', '00001/img00001000.png']
    assert from_zip.images.shape == (4, 3, 16, 16) and from_zip.num_classes == 7
    assert from_zip.labels.tolist() == [6, 0, 2, 3]
    assert torch.equal(from_zip.images, from_folder.images) and torch.equal(from_zip.labels, from_folder.labels)
    assert np.array_equal(from_zip.images[0].permute(1, 2, 0).numpy(), arrays[0])
    assert all(np.array_equal(from_zip.images[1, c].numpy(), arrays[1]) for c in range(3))  # grey replicated
    with PIL.Image.open(folder / names[3]) as img:
        assert np.array_equal(from_zip.images[2].permute(1, 2, 0).numpy(), np.asarray(img))  # the decoded JPEG
    assert np.array_equal(from_zip.images[3].permute(1, 2, 0).numpy(), arrays[2])

    ds = data.load_dataset('edm-dataset', root=str(zip_path), limit=3, resolution=8)
    expected = torch.nn.functional.avg_pool2d(from_zip.images[:3].float(), 2).round().to(torch.uint8)
    assert ds.images.shape == (3, 3, 8, 8) and torch.equal(ds.images, expected)
    assert ds.labels.tolist() == [6, 0, 2] and ds.num_classes == 7 and 'edm-dataset' in data.DATASETS
    with pytest.raises(data.DataError, match='one split'):
        data.load_dataset('edm-dataset', root=str(zip_path), split='test')


def test_edm_dataset_without_labels(tmp_path):
    zip_path, folder, *_ = _edm_dataset(tmp_path, labels=False)
    for root in (zip_path, folder):
        ds = data.load_edm_dataset(str(root))
        assert ds.labels.tolist() == [0, 0, 0, 0] and ds.num_classes == 1
    os.remove(folder / 'dataset.json')
    ds = data.load_edm_dataset(str(folder))
    assert ds.labels.tolist() == [0, 0, 0, 0] and ds.num_classes == 1


def test_edm_dataset_errors(tmp_path):
    import json
    import zipfile
    zip_path, folder, names, _, meta = _edm_dataset(tmp_path)

    def write_labels(labels):
        (folder / 'dataset.json').write_text(json.dumps({'labels': labels}))

    write_labels(meta['labels'][:-1])
    assert '00000/img00000002.jpeg' in _one_line_error(data.load_edm_dataset, str(folder))
    write_labels(meta['labels'] + [['00002/img00002000.png', 1]])
    assert '00002/img00002000.png' in _one_line_error(data.load_edm_dataset, str(folder))
    write_labels([[n, [0, 1]] for n, _ in meta['labels']])
    assert 'only integer class labels' in _one_line_error(data.load_edm_dataset, str(folder))
    (folder / 'dataset.json').write_text('{"labels": [')
    assert 'dataset.json' in _one_line_error(data.load_edm_dataset, str(folder))

    truncated = tmp_path / 'truncated.zip'
    truncated.write_bytes(zip_path.read_bytes()[:len(zip_path.read_bytes()) // 2])
    message = _one_line_error(data.load_edm_dataset, str(truncated))
    assert 'truncated.zip' in message and 'zip' in message
    with zipfile.ZipFile(zip_path) as zf:
        offset = zf.getinfo(names[0]).header_offset + 30 + len(names[0]) + 100  # inside the first image's bytes
    corrupt = bytearray(zip_path.read_bytes())
    corrupt[offset] ^= 0xFF
    (tmp_path / 'corrupt.zip').write_bytes(bytes(corrupt))
    message = _one_line_error(data.load_edm_dataset, str(tmp_path / 'corrupt.zip'))
    assert 'corrupt.zip' in message and names[0] in message

    message = _one_line_error(data.load_edm_dataset, str(tmp_path / 'missing.zip'))
    assert 'missing.zip does not exist' in message and 'dataset_tool.py --source=' in message


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


def test_center_crop_is_a_named_transform_as_in_edm_dataset_tool(tmp_path):
    """Images of any shape become square only through a named transform: EDM dataset_tool's
    center-crop (the centred square of the shorter side, Lanczos-resized to the resolution);
    without it they are refused, never silently reshaped."""
    import PIL.Image
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)   # H=20, W=30
    tall = rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)
    for name, arr in (('a.png', wide), ('b.png', tall)):
        PIL.Image.fromarray(arr).save(tmp_path / name)
    with pytest.raises(data.DataError, match=r'a.png is 30x20, not square; .*data.transform: center-crop'):
        data.load_dataset('image-folder', root=str(tmp_path))
    ds = data.load_dataset('image-folder', root=str(tmp_path), resolution=8, transform='center-crop')
    assert tuple(ds.images.shape) == (2, 3, 8, 8)
    # EDM's center_crop: img[(h - c) // 2:(h + c) // 2, (w - c) // 2:(w + c) // 2], then PIL LANCZOS to the size.
    expected_wide = np.asarray(PIL.Image.fromarray(wide[0:20, 5:25]).resize((8, 8), PIL.Image.LANCZOS))
    expected_tall = np.asarray(PIL.Image.fromarray(tall[4:20, 0:16]).resize((8, 8), PIL.Image.LANCZOS))
    assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), expected_wide)
    assert np.array_equal(ds.images[1].permute(1, 2, 0).numpy(), expected_tall)
    with pytest.raises(data.DataError, match="transform 'center-crop' needs one of center-crop and a resolution"):
        data.load_dataset('image-folder', root=str(tmp_path), transform='center-crop')
    with pytest.raises(data.DataError, match='data.transform applies to image files'):
        data.load_dataset('fashion-mnist', transform='center-crop', resolution=16)
