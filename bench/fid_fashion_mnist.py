"""FID sanity check on real data with the real FID network: Fashion-MNIST train vs test, and train
vs corrupted copies of the test images (Gaussian blur, additive noise). FID must be smallest for
the clean test split and grow with the corruption. (Corrupting the test images, not the train
images, keeps the finite-sample gap between the two sets the same in every row.)

    python bench/fid_fashion_mnist.py --n 1000 [--device cuda] [--weights PATH]

Prints a Markdown table. FID is biased upward at small n (the protocol is 10k vs 10k); compare
rows of one run, not with published values.
"""
import argparse
import time

import torch

from tasks import data, metrics


def blur(images, sigma):
    """Gaussian blur of uint8 images (separable, reflect padding)."""
    r = int(3 * sigma + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).reshape(1, 1, 1, -1)
    x = images.float()
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (r, r, 0, 0), mode='reflect'), k)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, r, r), mode='reflect'), k.transpose(-1, -2))
    return x.round().clamp(0, 255).to(torch.uint8)


def noise(images, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (images.float() + std * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--n', type=int, default=1000, help='images per set')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--weights', default=None, help='Inception weights file (default: cache or conversion)')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--test-only', action='store_true', help='only train vs test (the 10k protocol is slow on a CPU)')
    args = p.parse_args()

    weights = metrics.resolve_inception_weights(args.weights)
    extractor = metrics.InceptionFeatures(weights, device=args.device, batch_size=args.batch)
    train = data.load_fashion_mnist(split='train').subset(range(args.n))
    test = data.load_fashion_mnist(split='test').subset(range(args.n))
    start = time.time()
    ref = metrics.reference_statistics(train, extractor)
    rows = [('test split', test.images)]
    if not args.test_only:
        rows += [(f'test, Gaussian blur sigma={s} px', blur(test.images, s)) for s in (0.5, 1.0, 2.0)]
        rows += [(f'test, noise std={s}/255', noise(test.images, s)) for s in (8, 32)]
    print(f'FID vs Fashion-MNIST train[:{args.n}] ({weights.source}, sha256 {weights.sha256[:12]}, {args.device})\n')
    print('| compared set | n | FID |\n|---|---|---|')
    for name, images in rows:
        stats = metrics.FeatureStats()
        stats.add(extractor(images))
        print(f'| {name} | {args.n} | {metrics.frechet_distance(*stats.statistics(), ref["mu"], ref["sigma"]):.2f} |', flush=True)
    n_images = args.n * (len(rows) + 1)
    print(f'\n{n_images} images in {time.time() - start:.0f} s ({n_images / (time.time() - start):.1f} img/s features)')


if __name__ == '__main__':
    main()
