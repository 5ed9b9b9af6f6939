"""A patch discriminator (pix2pix / LDM's autoencoder loss) and its hinge losses, arranged so that one
optimizer step trains generator and discriminator together."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


class PatchDiscriminator(nn.Module):
    """Strided 4x4 convolutions down to one realness logit per patch (70x70 receptive field at 3 layers)."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, layers + 1):
            out = width * min(2 ** i, 8)
            blocks += [nn.Conv2d(c, out, 4, 2 if i < layers else 1, 1), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2)]
            c = out
        blocks.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image * 2 - 1)


def adversarial_losses(discriminator: PatchDiscriminator, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """(generator loss, discriminator hinge loss). The generator's is computed with detached discriminator
    weights and the discriminator's with a detached fake, so the sum of the two gives each network only its
    own gradient and a single optimizer step updates both."""
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    generator = -functional_call(discriminator, frozen, (fake,)).mean()
    critic = F.relu(1 - discriminator(real)).mean() + F.relu(1 + discriminator(fake.detach())).mean()
    return generator, critic
