"""Text-to-image sampling: our own denoising loop over diffusers components.

    pipe = Pipeline.from_pretrained("models/demo", scheduler="ddim")
    images = pipe("a red circle on the left", guidance_scale=7.5).images

Notation (Ho et al. 2020; Song et al. 2021): x_t = latents at timestep t, eps = predicted noise (or v / x0,
per the scheduler's prediction_type), x0_pred = the model's estimate of the clean latents, w = guidance scale.
The folder layout is diffusers': Stable Diffusion 1.x/2.x folders load here, and folders we save load in
diffusers' StableDiffusionPipeline.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor

from ldm.folders import atomic_folder, read_json, write_json
from ldm.models.denoiser import denoise
from ldm.models.sdxl import is_sdxl_unet
from ldm.models.text_encoders import OpenCLIPTextEncoder
from ldm.objectives import is_flow_scheduler, objective_for
from ldm.pipelines import drift, editing, sdxl
from ldm.pipelines.calls import inference, lora_scaled
from ldm.pipelines.drift import DriftRemedies, check_remedies
from ldm.pipelines.checks import check_call_inputs, check_finite, check_guidance, check_number
from ldm.pipelines.guidance import APGSettings, Guidance
from ldm.pipelines.loading import load_components, name_diffusers_pipeline
from ldm.pipelines.output import PipelineOutput, StepRecord, predict_x0
from ldm.pipelines.prompts import PromptTokens, check_prompt_options, repeat_windows, tokenize_prompts
from ldm.pipelines.recommended import GUIDANCE_FILE, read_recommended_guidance, resolve_guidance
from ldm.pipelines.schedulers import make_scheduler


class Pipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """VAE + CLIP text encoder + denoiser + scheduler, sampled with classifier-free guidance. The denoiser is a
    cross-attention UNet (`unet`, saved in unet/) or a diffusion transformer (`transformer`: ldm.models.dit's
    LatentDiT or diffusers' PixArtTransformer2DModel, saved in transformer/); `pipe.denoiser` is whichever."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "scheduler", "text_encoder_2", "tokenizer_2"]  # keyword defaults: diffusers saves them only so
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, unet: UNet2DConditionModel | None = None,
                 scheduler=None, transformer: torch.nn.Module | None = None, text_encoder_2=None, tokenizer_2=None,
                 force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        if (unet is None) == (transformer is None) or scheduler is None:
            raise ValueError("Pipeline needs a scheduler and one denoiser: unet= (a UNet2DConditionModel) or "
                             "transformer= (a LatentDiT or PixArtTransformer2DModel), not both")
        if is_sdxl_unet(unet) != (text_encoder_2 is not None and tokenizer_2 is not None):
            raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs text_encoder_2= and tokenizer_2=, "
                             "and only an SDXL UNet takes them")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              transformer=transformer, scheduler=scheduler, text_encoder_2=text_encoder_2,
                              tokenizer_2=tokenizer_2)
        # SDXL base's model_index.json: an empty negative prompt is all zeros, not the encoded "" (diffusers' rule)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        if text_encoder_2 is not None:  # set_adapters, fuse_lora, unload_lora_weights cover text_encoder_2 too
            self._lora_loadable_modules = StableDiffusionXLLoraLoaderMixin._lora_loadable_modules
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._schedule_config = dict(scheduler.config)  # the model's noise schedule, kept across scheduler swaps
        self.recommended_guidance = None  # the folder's guidance.json (ldm.pipelines.recommended), if any

    @property
    def denoiser(self) -> torch.nn.Module:
        """The backbone: the UNet or the transformer."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders, pooled text and size/crop micro-conditioning (ldm.models.sdxl)."""
        return self.text_encoder_2 is not None

    @property
    def num_latent_channels(self) -> int:
        """The channels of the latents sampled: the denoiser's input, less an inpainting UNet's mask and masked
        image latents (ldm.pipelines.editing)."""
        channels, latent = self.denoiser.config.in_channels, self.vae.config.latent_channels
        return latent if editing.is_inpainting_model(channels, latent) else channels

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, scheduler: str | None = None, torch_dtype: torch.dtype | None = None,
                        allow_pickle: bool = False, device: str | torch.device | None = None, **kwargs) -> "Pipeline":
        """Returns the pipeline stored in a local diffusers-layout folder (ours or Stable Diffusion's).

        scheduler: a name from ldm.pipelines.schedulers.SCHEDULERS ("ddpm", "ddim", "lms", ...) to replace the
        folder's.
        allow_pickle: load .bin/.ckpt weights, which can run code; refused by default.
        A guidance.json in the folder (`ldm eval-guidance --save`) becomes pipe.recommended_guidance, which calls
        without a guidance_scale use.
        """
        if scheduler is not None:
            make_scheduler(scheduler, {})  # validate the name before loading gigabytes
        recommended = read_recommended_guidance(path)  # a broken file fails here, before the weights load
        pipe = cls(**load_components(path, torch_dtype=torch_dtype, allow_pickle=allow_pickle, **kwargs))
        pipe.recommended_guidance = recommended
        if scheduler is not None:
            pipe.set_scheduler(scheduler)
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """Writes the pipeline as a diffusers folder with safetensors weights, atomically.

        For a UNet, model_index.json names StableDiffusionPipeline so that diffusers'
        DiffusionPipeline.from_pretrained opens the folder as Stable Diffusion (safety checker absent); our
        from_pretrained reads either name. A transformer's folder names this class (diffusers has no pipeline for
        a CLIP-conditioned DiT) through a custom pipeline file (ldm.pipelines.loading.name_diffusers_pipeline), so
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) opens it; its transformer/ opens with
        the model class's own from_pretrained. A recommended guidance (pipe.recommended_guidance) goes along as
        guidance.json.
        """
        if any(getattr(m, "fused_projections", False) for m in self.denoiser.modules()):
            raise RuntimeError("the denoiser's attention projections are fused (pipe.compile(fuse_qkv=True)), which adds "
                               "to_qkv/to_kv weights that Stable Diffusion folders do not have; save the pipeline "
                               "before fusing, or reload it from its folder to save it")
        kwargs.setdefault("safe_serialization", True)
        target = self
        if isinstance(self.text_encoder, OpenCLIPTextEncoder):  # stored as the equivalent CLIPTextModel, as SD 2.x is
            target = Pipeline(self.vae, self.text_encoder.to_clip_text_model(self.tokenizer.pad_token_id),
                              self.tokenizer, self.unet, self.scheduler, transformer=self.transformer)
        with atomic_folder(str(path)) as tmp:
            DiffusionPipeline.save_pretrained(target, tmp, **kwargs)
            index_path = os.path.join(tmp, "model_index.json")
            index = read_json(index_path)
            index.pop("transformer" if self.unet is not None else "unet", None)
            if not self.is_sdxl:  # SD 1.x/2.x and transformer folders keep their own pipelines' entries
                for name in ("text_encoder_2", "tokenizer_2", "force_zeros_for_empty_prompt"):
                    index.pop(name, None)
            if self.is_sdxl:  # opens as diffusers' StableDiffusionXL(Inpaint)Pipeline
                inpainting = self.num_latent_channels != self.unet.config.in_channels
                index.update(_class_name="StableDiffusionXLInpaintPipeline" if inpainting else "StableDiffusionXLPipeline",
                             feature_extractor=[None, None], image_encoder=[None, None])
            elif self.unet is not None:
                # an inpainting UNet's folder opens as diffusers' StableDiffusionInpaintPipeline
                inpainting = self.num_latent_channels != self.unet.config.in_channels
                index.update(_class_name="StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
                             safety_checker=[None, None],
                             feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False)
            else:
                index = name_diffusers_pipeline(tmp, index)
            write_json(index_path, index)
            if self.recommended_guidance is not None:
                write_json(os.path.join(tmp, GUIDANCE_FILE), self.recommended_guidance)

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: str | os.PathLike | None = None,
                         prediction_type: str | None = None, allow_pickle: bool = False,
                         torch_dtype: torch.dtype | None = None, scheduler: str | None = None,
                         device: str | torch.device | None = None) -> "Pipeline":
        """Returns the pipeline in an original-layout Stable Diffusion file (SD 1.x, 2.x, inpainting, SDXL base),
        offline.

        config: a preset name ("sd15", "sd21", ...) or a local diffusers folder giving the architecture (default:
        the file's metadata when ldm wrote it, else SD 1.x/2.x/SDXL base detected from its keys). prediction_type:
        "epsilon" or "v_prediction" (default: as diffusers guesses; see ldm.pipelines.single_file).
        allow_pickle: read a .ckpt with torch.load, which can run code; refused by default.
        """
        from ldm.pipelines.single_file import load_single_file

        if scheduler is not None:
            make_scheduler(scheduler, {})  # validate the name before reading gigabytes
        pipe = cls(**load_single_file(path, config=config, prediction_type=prediction_type,
                                      allow_pickle=allow_pickle, torch_dtype=torch_dtype))
        if scheduler is not None:
            pipe.set_scheduler(scheduler)
        return pipe.to(device) if device is not None else pipe

    def save_single_file(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> str:
        """Writes the original Stable Diffusion layout as one .safetensors file (A1111, ComfyUI, diffusers'
        from_single_file read it); dtype=torch.float16 halves it. Returns the path. A transformer backbone
        has no such layout and raises ValueError."""
        from ldm.pipelines.single_file import save_single_file

        return save_single_file(self, path, dtype=dtype)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          scale: float = 1.0, **kwargs) -> None:
        """Loads a LoRA file or folder (diffusers or kohya/web-UI keys) onto the UNet and text encoder(s).

        scale: the adapter's weight (0 = the base model exactly, 1 = as trained). It can also be set per call
        with cross_attention_kwargs={"scale": s}; the two multiply. A transformer's LoRA (keys
        "transformer.<module>.lora_A.weight", as `ldm finetune` writes them) goes onto the transformer. An SDXL
        pipeline loads as diffusers' StableDiffusionXLPipeline does (kohya's original-UNet block names and
        lora_te1_/lora_te2_ included) onto unet, text_encoder and text_encoder_2. Kohya / LyCORIS files of LoCon,
        LoHa, LoKr and DoRA (ldm/models/lycoris.py) load through peft.
        """
        from ldm.models.lora import check_lora_fits, load_transformer_lora, lora_shapes
        from ldm.models.lycoris import is_lycoris_file, load_lycoris_file

        check_number("lora_scale", scale)
        if self.transformer is not None:
            load_transformer_lora(self.transformer, pretrained_model_name_or_path_or_dict, adapter_name, scale)
            return
        shapes = lora_shapes(pretrained_model_name_or_path_or_dict, kwargs.get("weight_name"))
        if shapes is not None:
            check_lora_fits(shapes, self.unet, self.is_sdxl)
        if adapter_name is None:
            existing = {name for names in self.get_list_adapters().values() for name in names}
            adapter_name = next(f"lora_{i}" for i in range(len(existing) + 1) if f"lora_{i}" not in existing)
        if shapes is not None and is_lycoris_file(shapes):  # LoCon, LoHa, LoKr, DoRA kohya keys: peft directly
            load_lycoris_file(self, pretrained_model_name_or_path_or_dict, adapter_name, kwargs.get("weight_name"))
        else:
            loader = StableDiffusionXLLoraLoaderMixin if self.is_sdxl else StableDiffusionLoraLoaderMixin
            loader.load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        if scale != 1.0:
            self.set_adapters(adapter_name, adapter_weights=scale)

    def set_scheduler(self, name_or_scheduler) -> None:
        """Replaces the sampler, by name ("ddpm", "ddim", "lms", ...) or with any diffusers scheduler object; a
        flow-matching model takes "euler", "heun" or a FlowMatch scheduler object (others raise ValueError)."""
        if not isinstance(name_or_scheduler, str) and (is_flow_scheduler(name_or_scheduler)
                                                      != is_flow_scheduler(self._schedule_config)):
            kind = "a flow-matching" if is_flow_scheduler(self._schedule_config) else "a noise-prediction (DDPM-type)"
            raise ValueError(f"{type(name_or_scheduler).__name__} cannot sample {kind} model; pass a scheduler of its "
                             "kind, or a name: pipe.set_scheduler('euler')")
        self._schedule_config.update(self.scheduler.config)
        self.scheduler = make_scheduler(name_or_scheduler, self._schedule_config)

    def compile(self, channels_last: bool = False, fuse_qkv: bool = False, **compile_kwargs) -> "Pipeline":
        """Compiles the UNet in place with torch.compile (CPU or GPU); returns self. The first call is slow.

        channels_last: NHWC memory layout for the UNet, usually faster on GPUs. fuse_qkv: one matrix product for
        each attention's query, key and value (key and value in cross-attention; diffusers'
        fuse_qkv_projections): fewer, larger GEMMs; load LoRA weights before fusing. compile_kwargs go to
        torch.compile. On a GPU use mode="reduce-overhead" (CUDA graphs: one launch per UNet call, so the CPU's
        kernel launches stop bounding the step); mode="max-autotune" compiles for far longer. Speeds and compile
        times: benchmarks/BENCHMARKS.md, GPU.
        """
        if fuse_qkv:
            self.denoiser.fuse_qkv_projections()
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        self.denoiser.compile(**compile_kwargs)
        return self

    def enable_xformers(self) -> None:
        """Uses xformers' memory-efficient attention; raises RuntimeError saying why when it cannot."""
        try:
            import xformers  # noqa: F401
        except ImportError as e:
            raise RuntimeError("xformers is not installed (pip install 'ldm[xformers]'); "
                               "PyTorch's SDPA attention stays on, which is as fast on recent PyTorch") from e
        if self.device.type != "cuda":
            raise RuntimeError(f"xformers needs a CUDA device but the pipeline is on {self.device}; "
                               "call pipe.to('cuda') first, or keep the default SDPA attention")
        self.enable_xformers_memory_efficient_attention()

    # ------------------------------------------------------------------ prompt encoding

    def _tokenize(self, texts: list[str], prompt_syntax: str = "a1111", long_prompts: str = "chunk") -> PromptTokens:
        """Returns the prompts' token ids (B*k, 77) and emphasis weights (B, k, 77): ldm.pipelines.prompts."""
        return tokenize_prompts(self.tokenizer, texts, prompt_syntax, long_prompts)

    def _encode_ids(self, input_ids: torch.Tensor, clip_skip: int | None, device=None) -> torch.Tensor:
        """Returns text embeddings (B, 77, D): the last layer, or with clip_skip=k the k-th from last + final LN."""
        input_ids = input_ids.to(device if device is not None else self._execution_device)
        if clip_skip is None:
            return self.text_encoder(input_ids)[0]
        hidden = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        # transformers 5 flattened CLIPTextModel (no .text_model); 4.x nests it. diffusers 0.42's own clip_skip
        # path assumes the nested layout and fails on transformers 5.
        final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_norm(hidden)

    def encode_prompt(self, prompt: list[str], negative_prompt: list[str] | None, num_images_per_prompt: int,
                      do_cfg: bool, clip_skip: int | None = None, lora_scale: float | None = None,
                      device: torch.device | None = None, prompt_syntax: str = "a1111",
                      long_prompts: str = "chunk") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (prompt_embeds, negative_prompt_embeds), each (B * num_images_per_prompt, 77 * k, D).

        prompt_syntax="a1111" reads (word:1.3) emphasis and BREAK as AUTOMATIC1111 does; "plain" takes the text
        literally. long_prompts="chunk" encodes a prompt past 75 tokens in k windows of 77 and concatenates them,
        the shorter prompts (the negative ones included) padded with empty windows; "truncate" keeps the first
        window and warns naming the words it cuts (ldm.pipelines.prompts). A prompt of at most 75 tokens without
        emphasis gives k = 1 and the embeddings of a plain tokenizer + text encoder call, bit for bit.
        Both branches go through the text encoder in one batched call. clip_skip applies to both: a model
        trained on the k-th layer from the end saw the empty prompt through that layer too (diffusers 0.42
        applies it to the conditional branch only). lora_scale multiplies the text encoder's LoRA adapters
        for this call, as diffusers' encode_prompt does (the UNet's get the same scale through
        cross_attention_kwargs={"scale": s}). device: where the UNet runs (default: the execution device; pass
        it when known, since finding it walks every module). An SDXL model returns four tensors, as diffusers'
        StableDiffusionXLPipeline.encode_prompt: the two above (D = D1 + D2) and the pooled embeddings (B*n, D2)
        of the prompts and of the negative prompts (ldm.pipelines.sdxl).
        """
        device = device if device is not None else self._execution_device
        if self.is_sdxl:  # (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_...)
            return sdxl.encode_prompt(self, prompt, negative_prompt, num_images_per_prompt, do_cfg, clip_skip,
                                      lora_scale, device, prompt_syntax, long_prompts)
        uncond = (negative_prompt if negative_prompt is not None else [""] * len(prompt)) if do_cfg else []
        tokens = self._tokenize(uncond + prompt, prompt_syntax, long_prompts)  # every window of every prompt
        with lora_scaled(self.text_encoder, lora_scale):
            embeds = tokens.weighted(self._encode_ids(tokens.ids, clip_skip, device))  # (2B or B, 77*k, D)
        embeds = embeds.to(device, self.text_encoder.dtype).repeat_interleave(num_images_per_prompt, 0)
        if not do_cfg:
            return embeds, None
        negative_embeds, prompt_embeds = embeds.chunk(2)  # (B*n, 77*k, D) each
        return prompt_embeds, negative_embeds

    # ------------------------------------------------------------------ sampling

    def _step_kwargs(self, generator, eta: float) -> dict:
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta  # DDIM's eta (Song et al. 2021, Eq. 16): 0 = deterministic, 1 = DDPM-like
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @inference
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float | None = None,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, guidance_rescale: float = 0.0,
                 clip_skip: int | None = None, cross_attention_kwargs: dict | None = None,
                 prompt_syntax: str = "a1111", callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), trace: bool = False,
                 guidance_interval: tuple[float, float] | None = None, apg: bool | dict | APGSettings | None = None,
                 cfg_zero_star: bool = False, cfg_zero_init_steps: int = 0, image=None, mask_image=None, strength=None,
                 mask_blur=4, masked_content="original", paste_back=True, long_prompts: str = "chunk",
                 pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, original_size=None, eps_scale=1.0,
                 crops_coords_top_left=None, target_size=None, negative_original_size=None, eps_scale_slope=0.0,
                 negative_crops_coords_top_left=None, negative_target_size=None, dynamic_thresholding=None, restart=None):
        """Returns PipelineOutput(images, trace): images as PIL list, np (N,H,W,3) in [0,1], pt (N,3,H,W) or latents.

        guidance_scale <= 1 runs the conditional branch alone. None: the folder's recommended guidance (guidance.json:
        its scale, and its method parameters where this call leaves them at their defaults), else 7.5; a given scale
        takes no recommended method parameters. trace=True: a StepRecord per step, for ldm.diagnostics. Guidance
        methods (pipelines.guidance), off by default: guidance_interval=(t_lo, t_hi) guides only where t_lo <= t <=
        t_hi; apg=True / dict / APGSettings: adaptive projected guidance; cfg_zero_star=True: CFG-Zero*'s optimized
        scale; cfg_zero_init_steps=K: the first K steps predict 0 (flow models). prompt_syntax, long_prompts:
        encode_prompt. image, mask_image, strength, mask_blur, masked_content, paste_back: pipelines.editing. SDXL:
        pooled_prompt_embeds, original_size, crops_coords_top_left, target_size, negative_* (pipelines.sdxl). Drift
        remedies (off: pipelines.drift): eps_scale(_slope), dynamic_thresholding, restart."""
        # 0. Defaults and input checks
        guidance_scale, methods = resolve_guidance(self.recommended_guidance, guidance_scale, dict(
            guidance_rescale=guidance_rescale, guidance_interval=guidance_interval, apg=apg,
            cfg_zero_star=cfg_zero_star, cfg_zero_init_steps=cfg_zero_init_steps))
        edit, height, width = editing.prepare_call(self, image, mask_image, strength, mask_blur, masked_content,
                                                   paste_back, height, width)
        prompt, negative_prompt = check_call_inputs(
            self, prompt, height, width, num_inference_steps, guidance_scale, negative_prompt, num_images_per_prompt,
            eta, generator, latents, prompt_embeds, negative_prompt_embeds, output_type, methods["guidance_rescale"],
            callback_on_step_end_tensor_inputs, clip_skip)
        sdxl_inputs = sdxl.check_inputs(
            self, (height, width), prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
            negative_pooled_prompt_embeds, original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size)
        guidance = check_guidance(guidance_scale, **methods, steps=num_inference_steps)
        remedies = check_remedies(self.scheduler, eps_scale, eps_scale_slope, dynamic_thresholding, restart)
        device = self._execution_device  # where the UNet runs, CPU offload or not; read once (it walks every module)
        # 1. Encode the prompts: (B*n, 77*k, D) each; one batched UNet call per step later, uncond first
        prompt_embeds, negative_embeds, added = self._prompt_embeddings(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, guidance.enabled,
            clip_skip, (cross_attention_kwargs or {}).get("scale"), device, prompt_syntax, long_prompts, sdxl_inputs)
        # 2. Timesteps, and 3. the initial noise x_T: (B*n, 4, H/f, W/f)
        timesteps, host_timesteps = self._timesteps(num_inference_steps, device, edit)
        latents = self._initial_latents(len(prompt_embeds), height, width, generator, latents, prompt_embeds.dtype,
                                        device, edit, timesteps[0] if len(timesteps) else None)
        # 4. Denoising loop, with no sync per step (the finite flags are read once, in 5.)
        latents, finite, records = self._denoise(
            latents, timesteps, host_timesteps, prompt_embeds, negative_embeds, guidance,
            self._step_kwargs(generator, eta), cross_attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs, trace, edit, added, remedies)
        # 5. Decode z -> x, check that every step and the pixels are finite
        images = self._decode(latents, output_type, generator, finite, host_timesteps, edit)
        self.maybe_free_model_hooks()
        return PipelineOutput(images=images, trace=records) if return_dict else (images, records)

    def _prompt_embeddings(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                           num_images_per_prompt: int, do_cfg: bool, clip_skip: int | None, lora_scale: float | None,
                           device, prompt_syntax: str = "a1111", long_prompts: str = "chunk",
                           sdxl_inputs: dict | None = None):
        """Returns (prompt_embeds, negative_embeds, added), each embeds (B*n, 77*k, D), negative_embeds None
        without guidance: the prompts encoded, or the given embeddings repeated per image; without negative
        embeddings, the negative prompt's text encoded (or the empty prompt), padded with empty windows to their
        length. added: SDXL's pooled text (B*n, D2) and time_ids (B*n, 6) per branch for the UNet's time
        embedding (ldm.pipelines.sdxl, from sdxl_inputs: ldm.pipelines.sdxl.check_inputs), None otherwise."""
        check_prompt_options(prompt_syntax, long_prompts)  # also where embeddings are given, so no typo passes
        if self.is_sdxl:
            return sdxl.conditioning(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                     num_images_per_prompt, do_cfg, clip_skip, lora_scale, device, prompt_syntax,
                                     long_prompts, sdxl_inputs)
        if prompt_embeds is None:
            return *self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, do_cfg, clip_skip,
                                       lora_scale=lora_scale, device=device, prompt_syntax=prompt_syntax,
                                       long_prompts=long_prompts), None
        batch = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.to(device, self.text_encoder.dtype).repeat_interleave(num_images_per_prompt, 0)
        if not do_cfg:
            return prompt_embeds, None, None
        negative_embeds = negative_prompt_embeds
        if negative_embeds is None:  # the empty prompt's windows, after the negative prompt's text if there is one
            empty = self.encode_prompt([""] * batch, None, 1, False, device=device)[0]  # (B, 77, D)
            negative_embeds = repeat_windows(empty, prompt_embeds.shape[1])
            if negative_prompt is not None:
                text = self.encode_prompt(negative_prompt, None, 1, False, clip_skip, lora_scale, device,
                                          prompt_syntax, long_prompts)[0]  # (B, 77*j, D)
                if text.shape[1] > prompt_embeds.shape[1]:
                    raise ValueError(f"negative_prompt encodes to {text.shape[1]} tokens, more than the "
                                     f"{prompt_embeds.shape[1]} of prompt_embeds; pass negative_prompt_embeds")
                negative_embeds = torch.cat([text, negative_embeds[:, text.shape[1]:]], dim=1)
        return prompt_embeds, negative_embeds.to(prompt_embeds).repeat_interleave(num_images_per_prompt, 0), None

    def _timesteps(self, num_inference_steps: int, device, edit=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the sampler's timesteps on `device` and a copy on the host (an edit's: from the step its
        strength picks); raises ValueError when the spacing asks for a timestep the model was not trained on."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        # One copy to the host before the loop: the scheduler indexes its host tables (alphas_cumprod) with the
        # timestep, which with a device tensor makes the CPU wait for the GPU at every step.
        host_timesteps = timesteps.cpu()
        train_steps = self.scheduler.config.num_train_timesteps
        flow = is_flow_scheduler(self.scheduler)  # flow timesteps are sigma * T: t = T is pure noise, and valid
        if not flow and host_timesteps.max() >= train_steps:  # e.g. "leading" spacing, steps_offset=1 at T steps
            raise ValueError(f"num_inference_steps={num_inference_steps} makes this scheduler's "
                             f"{self.scheduler.config.get('timestep_spacing', 'leading')!r} spacing ask for "
                             f"t={int(host_timesteps.max())} of a {train_steps}-step model; use fewer steps or "
                             "pipe.set_scheduler(...) on a config with timestep_spacing='trailing'")
        if edit is not None:
            return editing.strength_timesteps(self.scheduler, timesteps, host_timesteps, num_inference_steps,
                                              edit.strength)
        return timesteps, host_timesteps

    def _initial_latents(self, count: int, height: int, width: int, generator, latents: torch.Tensor | None,
                         dtype: torch.dtype, device, edit=None, t_start=None) -> torch.Tensor:
        """Returns x_T ~ N(0, sigma_max^2 I) in latent space, (count, 4, H/f, W/f): drawn with `generator`, or
        the given latents, scaled by the sampler's initial sigma; an edit's start at t_start
        (ldm.pipelines.editing.initial_latents)."""
        shape = (count, self.num_latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if edit is not None:
            with sdxl.vae_upcast(self):  # the init image's encode
                return editing.initial_latents(self, edit, shape, generator, latents, t_start, dtype, device)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        # flow samplers start at sigma = 1 (x_1 = eps) and have no init_noise_sigma
        return latents.to(device, dtype) * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def _denoise(self, latents, timesteps, host_timesteps, prompt_embeds, negative_embeds, guidance: Guidance,
                 step_kwargs: dict, cross_attention_kwargs: dict | None, callback: Callable | None, callback_inputs,
                 trace: bool, edit=None, added: sdxl.AddedConditioning | None = None,
                 remedies: DriftRemedies = DriftRemedies()):
        """Returns (x_0 latents, one device flag "latents all finite" per step, the trace or None).

        The flags are read once, after the decode (one sync per call, none per step, so the CPU keeps queueing
        steps while the GPU works, and where a pil/np output waits for the GPU anyway), and a NaN/inf names its
        first step instead of coming back as a black image.
        """
        do_cfg = guidance.enabled
        records, finite = ([] if trace else None), []
        # x0 for samplers that do not report it, and the space APG guides in
        objective = objective_for(self.scheduler) if trace or guidance.apg is not None else None
        context = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds  # (2B*n or B*n, 77, D)
        plan = drift.step_plan(host_timesteps, remedies.restart)  # [(i, re-noise or None)]: restarts repeat steps
        with self.progress_bar(total=len(plan)) as progress, drift.thresholding(self.scheduler, remedies.threshold):
            for i, renoise in plan:
                t, t_host = timesteps[i], host_timesteps[i]
                if renoise is not None:  # Restart: x_{t_min} -> x_{t_max} by the forward process
                    latents = drift.renoise(latents, self.scheduler, host_timesteps, *renoise,
                                            step_kwargs.get("generator"))
                x_scaled, noise_pred, pred_cond, pred_uncond = self._guided_prediction(
                    latents, i, t, t_host, context, guidance, objective, cross_attention_kwargs, edit, added)
                noise_pred = drift.scale_eps(noise_pred, remedies, t_host)  # epsilon scaling: eps / lambda_t

                # 4c. x_t -> x_{t-1}
                x_t = latents
                step = self.scheduler.step(noise_pred, t_host, latents, **step_kwargs, return_dict=True)
                latents = editing.after_step(edit, self.scheduler, step.prev_sample, i, host_timesteps)
                if trace:
                    x0 = predict_x0(step, objective, x_scaled, noise_pred, t_host)
                    records.append(StepRecord.capture(i, t, x_t, x0, noise_pred, pred_cond, pred_uncond))

                if callback is not None:
                    latents, prompt_embeds, negative_embeds, context = self._run_callback(
                        callback, callback_inputs, i, t, latents, prompt_embeds, negative_embeds, context, do_cfg)
                finite.append(torch.isfinite(latents).all())
                progress.update()
        return latents, drift.per_step_flags(finite, plan), records

    def _guided_prediction(self, latents, i: int, t, t_host, context, guidance: Guidance, objective,
                           cross_attention_kwargs: dict | None, edit=None, added=None):
        """Returns (x_scaled, noise_pred, pred_cond, pred_uncond) at step i: the model input, the guided
        prediction and the two branches, each (B*n, 4, h, w); pred_uncond is None where the step runs the
        conditional branch alone (no guidance, outside guidance_interval, a zero-init step). added: SDXL's pooled
        text and time_ids (ldm.pipelines.sdxl.AddedConditioning), None for other models."""
        scale = getattr(self.scheduler, "scale_model_input", None)  # flow samplers feed x_sigma as it is
        x_scaled = scale(latents, t_host) if scale else latents  # sigma-schedulers' input scaling
        x_model = editing.model_input(edit, x_scaled)  # an inpainting UNet's cat[x, mask, masked latents]
        if not guidance.uses_uncond(i, float(t_host)):
            # 4a. The conditional branch alone: one call on (B*n, 4, h, w) with the prompt embeddings
            cond_context = context.chunk(2)[1] if guidance.enabled else context  # (B*n, 77, D)
            pred_cond = denoise(self.denoiser, x_model, t, cond_context, **(added.cond() if added else {}),
                                cross_attention_kwargs=cross_attention_kwargs)
            return x_scaled, guidance.unguided(i, pred_cond), pred_cond, None

        # 4a. One call for both branches: (2B*n, 4, h, w) with [uncond; cond] embeddings
        x_in = torch.cat([x_model, x_model])
        model_out = denoise(self.denoiser, x_in, t, context, **(added.both() if added else {}),
                            cross_attention_kwargs=cross_attention_kwargs)
        pred_uncond, pred_cond = model_out.chunk(2)  # (B*n, 4, h, w) each

        # 4b. Classifier-free guidance (Ho & Salimans 2022), or APG or CFG-Zero*; optionally rescaled (Lin et al.)
        to_x0 = None if objective is None else (lambda pred: objective.to_x0(pred.float(), x_scaled.float(), t_host))
        return x_scaled, guidance.combine(pred_uncond, pred_cond, to_x0), pred_cond, pred_uncond

    def _run_callback(self, callback: Callable, inputs, i: int, t, latents, prompt_embeds, negative_embeds, context,
                      do_cfg: bool):
        """Returns (latents, prompt_embeds, negative_embeds, context) after callback_on_step_end, which sees the
        tensors named in `inputs` and may replace them; the UNet's context is rebuilt only when embeddings change."""
        tensors = dict(latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds)
        out = callback(self, i, t, {k: tensors[k] for k in inputs})
        latents = out.pop("latents", latents)
        if "prompt_embeds" in out or "negative_prompt_embeds" in out:
            prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
            negative_embeds = out.pop("negative_prompt_embeds", negative_embeds)
            context = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        return latents, prompt_embeds, negative_embeds, context

    def _decode(self, latents, output_type: str, generator, finite: list, host_timesteps, edit=None):
        """Returns the images of x_0 latents in `output_type` (the latents themselves for "latent"); raises
        NonFiniteError naming the first step or the VAE when the latents or the pixels are not finite."""
        # z -> x with the VAE (latents were scaled by vae.config.scaling_factor in training)
        decoded = None
        if output_type != "latent":
            with sdxl.vae_upcast(self) as vae_dtype:  # SDXL's VAE overflows in float16: decoded in float32
                decoded = self.vae.decode((latents / self.vae.config.scaling_factor).to(vae_dtype), return_dict=False,
                                          generator=generator)[0]  # (B*n, 3, H, W)
        check_finite(finite, host_timesteps, self.scheduler, latents.dtype, decoded)  # a float16 VAE can overflow too
        if decoded is not None:
            decoded = editing.paste(edit, decoded)  # inpainting's paste-back of the pixels outside the mask
        return latents if decoded is None else self.image_processor.postprocess(decoded, output_type=output_type)
