"""MiniGPT-5's latent-diffusion loss through a frozen denoiser and VAE (kept outside the GILL state dict)."""

import torch
import torch.nn.functional as F


class LatentDiffusionLoss:
    """Denoising loss of the frozen denoiser conditioned on GILL's mapper output.

    UNet layouts (SD 1.x / 2.x, SDXL): uniform timesteps in ``[0, num_train_timesteps)``, target = the noise (or the
    velocity for v-prediction schedulers), optional Min-SNR-gamma weighting; SDXL UNets (``text_time`` added
    embedding) also take the pooled vector and the size / crop time ids (original = target = the image size, no crop).

    Transformer layouts (SD3, Flux) are trained by flow matching as diffusers' ``train_dreambooth_sd3.py`` /
    ``train_dreambooth_flux.py`` do (their defaults, without output preconditioning): ``u`` drawn by the family's
    ``weighting_scheme`` (SD3 ``"logit_normal"``: sigmoid of N(0, 1); Flux ``"none"``: uniform), the timestep and
    sigma at index ``u * num_train_timesteps`` of the scheduler's training schedule (SD3's static ``shift``; Flux's
    schedule is shifted by resolution at inference only), ``x_t = (1 - sigma) x_0 + sigma noise``, target = the
    velocity ``noise - x_0``, weighted by ``compute_loss_weighting_for_sd3`` (1 for both defaults). Latents are
    ``(vae latents - shift_factor) * scaling_factor``; Flux packs them into 2 x 2 tokens with their position ids and
    embeds ``guidance_scale`` (its family default, 3.5) when its transformer has a guidance embedding.

    ``unet`` is the denoiser (a UNet, or an SD3 / Flux transformer). Deliberately not an ``nn.Module``: attaching
    it to a model never adds denoiser/VAE weights to its state dict or optimizer.
    """

    def __init__(self, unet, vae, scheduler, snr_gamma: float | None = None):
        from ..diffusion_layouts import FAMILIES, layout_of_configs

        self.unet, self.vae, self.scheduler, self.snr_gamma = unet, vae, scheduler, snr_gamma
        self.layout = layout_of_configs(type(unet).__name__, unet.config, scheduler.config)
        self.family = FAMILIES[self.layout.family]
        if self.layout.objective == "flow_matching":
            if snr_gamma is not None:
                raise ValueError(f"snr_gamma (Min-SNR weighting) applies to epsilon / v-prediction; the "
                                 f"{self.layout} layout is trained by flow matching")
            # a fresh copy holds the training schedule (num_train_timesteps sigmas), whatever set_timesteps did
            self.scheduler = type(scheduler).from_config(scheduler.config)
        for module in (unet, vae):
            module.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, diffusion_model: str, snr_gamma: float | None = None, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "LatentDiffusionLoss":
        import diffusers

        from ..diffusion_layouts import FAMILIES, layout_of_folder

        family = FAMILIES[layout_of_folder(diffusion_model).family]
        components = diffusers.DiffusionPipeline.load_config(diffusion_model)
        denoiser_class = getattr(diffusers, components[family.denoiser][1])
        denoiser = denoiser_class.from_pretrained(diffusion_model, subfolder=family.denoiser, torch_dtype=dtype)
        vae = diffusers.AutoencoderKL.from_pretrained(diffusion_model, subfolder="vae", torch_dtype=dtype)
        scheduler_class = diffusers.FlowMatchEulerDiscreteScheduler if family.denoiser == "transformer" \
            else diffusers.DDPMScheduler  # the training noise schedule of the family's objective
        scheduler = scheduler_class.from_pretrained(diffusion_model, subfolder="scheduler")
        return cls(denoiser.to(device), vae.to(device), scheduler, snr_gamma)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Pixel side the VAE expects so latents match the denoiser's ``sample_size`` (Flux: FluxPipeline's 128)."""
        return self.unet.config.get("sample_size", 128) * self.vae_scale_factor

    def to(self, device) -> "LatentDiffusionLoss":
        self.unet.to(device)
        self.vae.to(device)
        return self

    def __call__(self, cond: torch.Tensor, pixel_values: torch.Tensor, pooled: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """``cond`` ``(N, L, D)`` mapper outputs, ``pixel_values`` ``(N, 3, S, S)`` in [-1, 1], ``pooled`` ``(N, P)``
        (layouts with a pooled vector: SDXL, SD3, Flux) -> scalar loss."""
        if cond.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"{cond.shape[0]} generation embeddings but {pixel_values.shape[0]} target images")
        takes_pooled = self.layout.pooled_dim is not None
        if takes_pooled != (pooled is not None):
            raise ValueError(f"the {self.layout} denoiser needs the pooled vector (N, P) as well" if takes_pooled
                             else f"pooled given, but the {self.layout} denoiser takes no pooled vector")
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(cond.device, self.vae.dtype)).latent_dist.sample()
            latents = (latents - (self.vae.config.get("shift_factor") or 0.0)) * self.vae.config.scaling_factor
        if self.layout.objective == "flow_matching":
            return self._flow_matching_loss(cond, latents, pooled)
        return self._denoising_loss(cond, latents, pooled, pixel_values.shape[-2:])

    def _denoising_loss(self, cond, latents, pooled, side) -> torch.Tensor:
        """epsilon / v-prediction UNets: ``latents`` ``(N, 4, h, w)``."""
        device, dtype = cond.device, self.unet.dtype
        noise = torch.randn_like(latents)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = self.scheduler.add_noise(latents, noise, steps)
        added = None
        if pooled is not None:
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

    def _flow_matching_loss(self, cond, latents, pooled) -> torch.Tensor:
        """SD3 / Flux transformers: ``latents`` ``(N, C, h, w)``, velocity target (see the class docstring)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        device, dtype = cond.device, self.unet.dtype
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling(self.family.timestep_sampling, latents.shape[0], logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        timesteps = self.scheduler.timesteps[indices].to(device)  # (N,) in [0, num_train_timesteps]
        sigmas = self.scheduler.sigmas[indices].to(device, latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        if self.family.packed_latents:
            pred = self._flux_prediction(noisy.to(dtype), timesteps, cond.to(dtype), pooled.to(dtype))
        else:
            pred = self.unet(hidden_states=noisy.to(dtype), timestep=timesteps, encoder_hidden_states=cond.to(dtype),
                             pooled_projections=pooled.to(dtype), return_dict=False)[0]
        weighting = compute_loss_weighting_for_sd3(self.family.timestep_sampling, sigmas)
        per_sample = (weighting.float() * (pred.float() - (noise - latents).float()) ** 2).flatten(1).mean(1)
        return per_sample.mean()

    def _flux_prediction(self, noisy, timesteps, cond, pooled) -> torch.Tensor:
        """Flux: ``(N, C, h, w)`` latents packed into ``(N, h/2 * w/2, 4C)`` tokens -> the velocity, unpacked."""
        from diffusers import FluxPipeline

        n, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(cond.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = torch.full((n,), self.family.guidance_scale, device=noisy.device, dtype=noisy.dtype) \
            if self.unet.config.guidance_embeds else None
        pred = self.unet(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
                         encoder_hidden_states=cond, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(pred, h * self.vae_scale_factor, w * self.vae_scale_factor,
                                            self.vae_scale_factor)
