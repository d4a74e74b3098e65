"""Training losses of EDM Table 1: noise distribution p(sigma) and loss weight lambda(sigma).

    VP:   sigma = sigma_vp(t), t ~ U(epsilon_t, 1),          lambda = 1 / sigma^2
    VE:   log sigma ~ U(log sigma_min, log sigma_max),        lambda = 1 / sigma^2
    EDM:  log sigma ~ N(P_mean, P_std^2),                     lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2

Each returns the per-element weighted loss lambda(sigma) ||D(y + n; sigma) - y||^2 (shape of the
images), as EDM does; the training loop sums it and divides by the batch size. `generator`
makes the draws reproducible (checkpoint resume, tests). With return_denoised=True the loss
comes with (sigma, D(y + n; sigma)), which dynamic recording (tasks.calibration) learns from.
"""
import torch



def _rand(kind, images, generator):
    shape = [images.shape[0]] + [1] * (images.ndim - 1)
    fn = torch.rand if kind == 'uniform' else torch.randn
    return fn(shape, device=images.device, generator=generator)


class VPLoss:
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def sample_sigma(self, images, generator=None):
        t = 1 + _rand('uniform', images, generator) * (self.epsilon_t - 1)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def weight(self, sigma):
        return 1 / sigma ** 2

    def __call__(self, net, images, labels=None, augment_labels=None, generator=None, return_denoised=False):
        return _weighted_denoising_loss(self, net, images, labels, augment_labels, generator, return_denoised)


class VELoss:
    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sample_sigma(self, images, generator=None):
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** _rand('uniform', images, generator))

    def weight(self, sigma):
        return 1 / sigma ** 2

    def __call__(self, net, images, labels=None, augment_labels=None, generator=None, return_denoised=False):
        return _weighted_denoising_loss(self, net, images, labels, augment_labels, generator, return_denoised)


class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def sample_sigma(self, images, generator=None):
        return (_rand('normal', images, generator) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def __call__(self, net, images, labels=None, augment_labels=None, generator=None, return_denoised=False):
        return _weighted_denoising_loss(self, net, images, labels, augment_labels, generator, return_denoised)


def _weighted_denoising_loss(loss, net, images, labels, augment_labels, generator, return_denoised):
    sigma = loss.sample_sigma(images, generator)
    n = torch.randn(images.shape, device=images.device, generator=generator) * sigma
    kwargs = {} if augment_labels is None else dict(augment_labels=augment_labels)
    D_yn = net(images + n, sigma, labels, **kwargs)
    weighted = loss.weight(sigma) * (D_yn - images) ** 2
    return (weighted, sigma, D_yn) if return_denoised else weighted


LOSSES = {'vp': VPLoss, 've': VELoss, 'edm': EDMLoss}


def build_loss(name, **kwargs):
    if name not in LOSSES:
        raise ValueError(f'unknown loss {name!r}; valid: {", ".join(LOSSES)}')
    return LOSSES[name](**kwargs)
