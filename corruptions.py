"""The robustness sweep's held-out families: changes that lenet5_reg's training never makes.

Each is a way that real digits differ from MNIST's and that no operation of the augmentation
(distortions.py) produces, at any strength: ink added near the digit (the ruled lines of lined
paper, the edges of a form's box around a cropped digit, a dotted guide line), uneven light (a
shadow over part of the page), camera shake (motion blur), a wavy (elastic) warp and a coarse scan
scaled back up. They were chosen before any recipe was tuned on them. Nothing here is shared with
distortions.py, and tests/test_corruptions.py holds that the augmentation calls none of it.

Each takes a (N, 1, H, W) batch in [0, 1] with background 0, on any device, a strength (one number
for the batch; 0 leaves the batch unchanged) and a ``torch.Generator`` on the CPU. Each image's
random draws (positions, angles, fields) are one row of a single draw for the batch, so the same
seed gives an image the same change whatever the batch size. The helpers that draw them (``draws``,
``centres``, ``line_ink``, ``over``) draw validation.py's families too.
"""

import math

import torch
import torch.nn.functional as F


def draws(batch, generator, *shape):
    """(N, *shape) uniform draws in [0, 1), one row per image, on the batch's device."""
    return torch.rand(batch.shape[0], *shape, generator=generator).to(batch.device, batch.dtype)


def centres(batch):
    """(H * W, 2): the x and y of each pixel's centre."""
    height, width = batch.shape[-2:]
    ys, xs = torch.meshgrid(
        torch.arange(height, device=batch.device, dtype=batch.dtype) + 0.5,
        torch.arange(width, device=batch.device, dtype=batch.dtype) + 0.5,
        indexing="ij",
    )
    return torch.stack([xs.flatten(), ys.flatten()], 1)


def line_ink(distance, width):
    """Anti-aliased ink of a line ``width`` pixels wide, at ``distance`` from its centre line."""
    return (width / 2 + 0.5 - distance).clamp(0, 1)


def over(batch, ink):
    """Ink (N, H * W) laid over the batch: each pixel keeps the brighter of the two."""
    return torch.maximum(batch, ink.view(batch.shape))


# ------------------------------------------------------------ ink added near the digit


def ruled_lines(batch, darkness, generator):
    """Lined paper: lines one pixel wide and ``darkness`` bright, 9 to 13 pixels apart, at heights
    of their own in each image."""
    if not darkness:
        return batch
    u = draws(batch, generator, 2)
    spacing = 9 + (u[:, :1] * 5).floor()
    first = (u[:, 1:] * spacing).floor() + 0.5
    offset = torch.remainder(centres(batch)[:, 1] - first, spacing)
    distance = torch.minimum(offset, spacing - offset)
    return over(batch, darkness * line_ink(distance, 1.0))


def box_edges(batch, width, generator):
    """A digit cropped from a form's box: the box's left and right edges, ``width`` pixels wide,
    1 to 3 pixels in from each side of the image."""
    if not width:
        return batch
    u = draws(batch, generator, 2)
    side = batch.shape[-1]
    left, right = 1 + 2 * u[:, :1] + width / 2, side - 1 - 2 * u[:, 1:] - width / 2
    xs = centres(batch)[:, 0]
    distance = torch.minimum((xs - left).abs(), (xs - right).abs())
    return over(batch, line_ink(distance, width))


def dotted_line(batch, radius, generator):
    """A dotted guide line through the digit's box, within 30 degrees of level: round dots
    ``radius`` pixels in radius, 4 pixels apart."""
    if not radius:
        return batch
    u = draws(batch, generator, 4)
    through = 8 + 12 * u[:, :2]
    angle = (u[:, 2] - 0.5) * math.pi / 3
    direction = torch.stack([angle.cos(), angle.sin()], 1)
    offset = centres(batch).unsqueeze(0) - through.unsqueeze(1)  # (N, P, 2)
    along = (offset * direction.unsqueeze(1)).sum(2) - 4 * u[:, 3:]
    across = offset[..., 0] * direction[:, 1:] - offset[..., 1] * direction[:, :1]
    to_dot = torch.remainder(along + 2, 4.0) - 2
    return over(batch, (radius + 0.5 - torch.hypot(to_dot, across)).clamp(0, 1))


# ------------------------------------------------------------ light, motion, warps, scans


def shadow(batch, darkness, generator):
    """Uneven light: a soft-edged shadow over one side of the page, the paper under it darkened by
    ``darkness`` (toward the ink's level), its edge a line through the digit's box at an angle of
    its own. Ink stays ink."""
    u = draws(batch, generator, 3)
    angle = 2 * math.pi * u[:, 0]
    normal = torch.stack([angle.cos(), angle.sin()], 1)
    through = 6 + 16 * u[:, 1:]
    side = ((centres(batch).unsqueeze(0) - through.unsqueeze(1)) * normal.unsqueeze(1)).sum(2)
    shade = darkness * torch.sigmoid(side / 2)
    return torch.lerp(batch, torch.ones_like(batch), shade.view(batch.shape))


def motion_blur(batch, length, generator):
    """Camera shake: each image smeared evenly along a line of ``length`` pixels at an angle of its
    own (one grouped convolution, a kernel per image)."""
    if not length:
        return batch
    n, _, height, width = batch.shape
    side = 2 * math.ceil(length / 2) + 1
    angle = math.pi * draws(batch, generator)
    half = length / 2 * torch.stack([angle.cos(), angle.sin()], 1)  # (N, 2)
    taps = centres(batch[..., :side, :side]) - side / 2  # (side * side, 2), centred
    along = (taps @ half.T).T / half.square().sum(1, keepdim=True)  # (N, taps): -1 to 1 on the line
    nearest = along.clamp(-1, 1).unsqueeze(2) * half.unsqueeze(1)
    kernel = line_ink((taps.unsqueeze(0) - nearest).norm(dim=2), 1.0)
    kernel = (kernel / kernel.sum(1, keepdim=True)).view(n, 1, side, side)
    smeared = F.conv2d(batch.reshape(1, n, height, width), kernel, padding=side // 2, groups=n)
    return smeared.view(batch.shape)


def elastic(batch, pixels, generator):
    """A wavy warp (Simard et al. 2003): every pixel moved by a smooth random field, uniform noise
    under a Gaussian of sigma 4 pixels, scaled to move pixels ``pixels`` on average (root mean
    square)."""
    if not pixels:
        return batch
    n, _, height, width = batch.shape
    field = F.pad(2 * draws(batch, generator, 2, height, width) - 1, (12,) * 4, mode="reflect")
    # the Gaussian is separable: along x, then along y, each a product with a band matrix (many
    # times faster than a grouped convolution on the CPU)
    field = _smoothing(height, field).T @ (field @ _smoothing(width, field))
    field = field / field.square().mean((1, 2, 3), keepdim=True).sqrt() * pixels
    moved = centres(batch).view(1, height, width, 2) + field.permute(0, 2, 3, 1)
    # grid_sample's -1 and 1 are the image's outer edges
    size = torch.tensor([width, height], device=batch.device, dtype=batch.dtype)
    return F.grid_sample(batch, moved / size * 2 - 1, align_corners=False, padding_mode="zeros")


def _smoothing(size, like):
    """(size + 24, size): column j the Gaussian of sigma 4 pixels (25 taps) centred on row j + 12,
    what smooths a row that reflection padded by 12 pixels each side."""
    rows = torch.arange(size + 24, device=like.device, dtype=like.dtype).view(-1, 1)
    distance = rows - 12 - torch.arange(size, device=like.device, dtype=like.dtype)
    band = torch.exp(-distance.square() / 32) * (distance.abs() <= 12)
    return band / band.sum(0)


def coarse_scan(batch, side, generator=None):
    """A low-resolution scan scaled back up: each image scaled down to ``side`` x ``side`` pixels
    (bilinear, anti-aliased: each small pixel averages what it covers), then bilinear back up."""
    height, width = batch.shape[-2:]
    if side >= min(height, width):
        return batch
    small = F.interpolate(
        batch, size=(int(side), int(side)), mode="bilinear", antialias=True, align_corners=False
    )
    return F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
