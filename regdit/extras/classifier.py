"""A small CNN fitted in seconds on a small dataset's real images: a score for generated samples
that needs no download. The score is the share of samples it assigns to their conditioning class;
its accuracy on real images it did not see says how far that score can be trusted."""
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _batch(images):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def fit_classifier(images, labels, num_classes, steps=300, batch_size=64, seed=0):
    """A 3-layer CNN trained on uint8 images (N, H, W, 3) with shifts of up to 2 px, horizontal
    flips (the training data's own augmentation) and pixel noise of a random std up to 0.2 (images
    in [-1, 1]), AdamW with a cosine learning rate. Without the noise, a few specks a sample leaves
    around an edge can decide its class."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))
    x, y = _batch(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        index = torch.randint(len(x), (batch_size,), generator=generator)
        batch = F.pad(x[index], (2, 2, 2, 2), mode="replicate")
        dy, dx = torch.randint(5, (2,), generator=generator).tolist()
        batch = batch[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
        batch = batch + 0.2 * torch.rand(batch_size, 1, 1, 1, generator=generator) * torch.randn(
            batch.shape, generator=generator)
        loss = F.cross_entropy(model(batch), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predict(model, images, batch_size=500):
    """Predicted labels (N,) of uint8 images (N, H, W, 3)."""
    return np.concatenate([model(_batch(images[i:i + batch_size])).argmax(1).numpy()
                           for i in range(0, len(images), batch_size)])


def class_score(real_images, real_labels, num_classes, samples, sample_labels, held_out=0.2,
                seed=0):
    """(score, held-out accuracy): fit on a random (1 - held_out) share of the real images; the
    score is the share of samples predicted as their conditioning class, the accuracy that of the
    remaining real images."""
    real_labels = np.asarray(real_labels)
    order = np.random.default_rng(seed).permutation(len(real_images))
    cut = len(order) - max(int(held_out * len(order)), 1)
    model = fit_classifier(real_images[order[:cut]], real_labels[order[:cut]], num_classes,
                           seed=seed)
    accuracy = float((predict(model, real_images[order[cut:]]) == real_labels[order[cut:]]).mean())
    score = float((predict(model, samples) == np.asarray(sample_labels)).mean())
    return score, accuracy
