"""MiniGPT-5's latent-diffusion loss through a frozen UNet and VAE (kept outside the GILL state dict)."""

import torch
import torch.nn.functional as F


class LatentDiffusionLoss:
    """Denoising loss of the frozen UNet conditioned on GILL's mapper output.

    Uniform timesteps in ``[0, num_train_timesteps)``, target = the noise (or the velocity for v-prediction
    schedulers), optional Min-SNR-gamma weighting. SDXL UNets (``text_time`` added embedding) also take the pooled
    vector and the size / crop time ids (original = target = the image size, no crop). Deliberately not an
    ``nn.Module``: attaching it to a model never adds UNet/VAE weights to its state dict or optimizer.
    """

    def __init__(self, unet, vae, scheduler, snr_gamma: float | None = None):
        self.unet, self.vae, self.scheduler, self.snr_gamma = unet, vae, scheduler, snr_gamma
        for module in (unet, vae):
            module.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, diffusion_model: str, snr_gamma: float | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "LatentDiffusionLoss":
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(diffusion_model, subfolder="unet", torch_dtype=dtype).to(device)
        vae = AutoencoderKL.from_pretrained(diffusion_model, subfolder="vae", torch_dtype=dtype).to(device)
        scheduler = DDPMScheduler.from_pretrained(diffusion_model, subfolder="scheduler")
        return cls(unet, vae, scheduler, snr_gamma)

    @property
    def image_size(self) -> int:
        """Pixel side the VAE expects so latents match the UNet's ``sample_size``."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device) -> "LatentDiffusionLoss":
        self.unet.to(device)
        self.vae.to(device)
        return self

    def __call__(self, cond: torch.Tensor, pixel_values: torch.Tensor, pooled: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """``cond`` ``(N, L, D)`` mapper outputs, ``pixel_values`` ``(N, 3, S, S)`` in [-1, 1], ``pooled`` ``(N, P)``
        (SDXL UNets only) -> scalar loss."""
        if cond.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"{cond.shape[0]} generation embeddings but {pixel_values.shape[0]} target images")
        takes_pooled = self.unet.config.addition_embed_type == "text_time"
        if takes_pooled != (pooled is not None):
            raise ValueError("this UNet needs the pooled vector (N, P) as well" if takes_pooled else
                             "pooled given, but this UNet takes no pooled vector")
        device, dtype = cond.device, self.unet.dtype
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(device, self.vae.dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor  # (N, 4, h, w)
        noise = torch.randn_like(latents)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = self.scheduler.add_noise(latents, noise, steps)
        added = None
        if pooled is not None:
            side = pixel_values.shape[-2:]
            time_ids = torch.tensor([[*side, 0, 0, *side]], device=device, dtype=dtype).repeat(cond.shape[0], 1)
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
        pred = self.unet(noisy.to(dtype), steps, encoder_hidden_states=cond.to(dtype), added_cond_kwargs=added).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (N,)
        if self.snr_gamma is not None:
            alphas = self.scheduler.alphas_cumprod.to(device)[steps]
            snr = alphas / (1 - alphas)
            capped = snr.clamp(max=self.snr_gamma)
            weight = capped / (snr + 1) if self.scheduler.config.prediction_type == "v_prediction" else capped / snr
            per_sample = per_sample * weight
        return per_sample.mean()
