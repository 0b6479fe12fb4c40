"""An optional adversarial loss for stage 1: a patch discriminator that sharpens the decoder."""

from __future__ import annotations

import torch

from mrivq.utils.distributed import average_gradients


class Adversary:
    """A patch discriminator that sharpens the decoder (Isola et al. 2017; Esser et al. 2021, VQGAN).

    MONAI's ``PatchDiscriminator`` scores overlapping patches of a volume as real or decoded with the
    least-squares GAN loss (Mao et al. 2017, MONAI's ``PatchAdversarialLoss``). :meth:`step` first updates
    the discriminator on ``x`` (real) and the detached reconstruction (fake), in float32 outside autocast,
    then returns the generator's loss for the reconstruction, which the training loop adds to the VQ-VAE's
    loss scaled by ``train.adversarial_weight``. ``train.adversarial_start`` delays it until the
    autoencoder reconstructs something, as VQGAN does. Its state is saved in ``vqvae_last.pt`` so that
    ``--resume`` continues it exactly.
    """

    def __init__(self, disc: torch.nn.Module, lr: float, weight: float, start: int, grad_clip: float) -> None:
        from monai.losses import PatchAdversarialLoss

        self.disc, self.weight, self.start, self.grad_clip = disc, weight, start, grad_clip
        self.opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.9))
        self.loss = PatchAdversarialLoss(criterion="least_squares")
        self.last_d_loss = float("nan")

    @classmethod
    def from_config(cls, tcfg: dict, dims: int, in_channels: int, device: torch.device) -> Adversary:
        from monai.networks.nets import PatchDiscriminator

        disc = PatchDiscriminator(spatial_dims=dims, channels=int(tcfg["disc_channels"]), in_channels=in_channels,
                                  num_layers_d=int(tcfg["disc_layers"]), norm="INSTANCE").to(device)
        return cls(disc, float(tcfg["disc_lr"] or tcfg["lr"]), float(tcfg["adversarial_weight"]),
                   int(tcfg["adversarial_start"]), float(tcfg["grad_clip"]))

    def step(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            self.disc.train()
            d_loss = 0.5 * (self.loss(self.disc(x_hat.detach().float())[-1], target_is_real=False,
                                      for_discriminator=True)
                            + self.loss(self.disc(x.float())[-1], target_is_real=True, for_discriminator=True))
            self.opt.zero_grad(set_to_none=True)
            d_loss.backward()
            average_gradients(self.disc.parameters())  # under torchrun, as DDP does for the VQ-VAE
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.grad_clip)
            self.opt.step()
            self.last_d_loss = float(d_loss.detach())
            for p in self.disc.parameters():  # the generator's loss trains the VQ-VAE only
                p.requires_grad_(False)
            g_loss = self.loss(self.disc(x_hat.float())[-1], target_is_real=True, for_discriminator=False)
            for p in self.disc.parameters():
                p.requires_grad_(True)
        return g_loss

    def state_dict(self) -> dict:
        return {"discriminator": self.disc.state_dict(), "discriminator_optimizer": self.opt.state_dict()}

    def load_state_dict(self, ck: dict) -> None:
        """Restore from a stage-1 checkpoint; one saved without a discriminator (turned on later) leaves
        it fresh."""
        if "discriminator" in ck:
            self.disc.load_state_dict(ck["discriminator"])
            self.opt.load_state_dict(ck["discriminator_optimizer"])
