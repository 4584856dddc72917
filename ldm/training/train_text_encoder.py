"""A CLIP text encoder trained from nothing, contrastively, on the data's (image, caption) pairs: the body of
`ldm train-text-encoder` and train/train_text_encoder.py.

Text side: a preset's CLIPTextModel (random init; `small` by default) or a folder's (to continue it), read through
the SD tokenizer. Its pooled output, the final state of the EOS token (`pooler_output`), passes a learned linear
projection into the shared embedding space. A diffusion model later consumes the token states
(`last_hidden_state`, (B, 77, D)), not the projection: contrastive training shapes them through the pooled token
only. The EOS state is itself one of them; the others move only through the weights they share with it
(tests/test_text_encoder_training.py checks held-out wordings on the EOS state and on the mean of all 77 states).

Image side: a small open_clip vision transformer over the pixels (32 px, patches of 8: 16 tokens), not over VAE
latents: it works with every data source as it is, needs neither a trained VAE nor a latent cache, and ties the
text encoder to no VAE; and 16 patches of a 32 px image are as many tokens as a 4x8x8 latent in patches of 2.

Loss: symmetric InfoNCE over the batch's pairs with a learned temperature (open_clip's ClipLoss; Radford et al.
2021, arXiv:2103.00020, Fig. 3), the logit scale initialised at log(1/0.07) and clamped at 100 as CLIP does. Each
process (and each micro-batch) contrasts its own pairs only.

Validation: the first val_samples pairs of the data (unshuffled order) are held out: their keys never enter a
training batch. Every validation_every steps their contrastive loss and text->image top-1 retrieval accuracy
(within batches of batch_size) are logged. A retrieved image counts as a hit when its caption equals the text
(identical captions cannot be told apart); val_chance is what random retrieval scores.

Output: each checkpoint (output_dir/checkpoints/checkpoint-N/) holds text_encoder/ (CLIPTextModel, safetensors)
and tokenizer/, the two subfolders of a diffusers model folder; `ldm train --text_encoder output_dir` loads the
newest. The projection and the image tower live in the Accelerate state only (--resume continues them).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.models.presets import MODEL_PRESETS, build_text_encoder, get_spec
from ldm.models.tokenizer import build_clip_tokenizer, save_clip_tokenizer
from ldm.training import loop
from ldm.training.checkpoint import list_checkpoints, resolve_resume, where_written
from ldm.training.config import format_config, save_config
from ldm.ranges import setting
from ldm.training.base_config import TrainingConfig
from ldm.training.optimizers import check_schedule
from ldm.training.step import batch_captions, step_generator
from ldm.training.stream import BatchStream
from ldm.training.validation import first_samples

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature (Radford et al. 2021, Sec. 2.5)
MAX_LOGIT_SCALE = math.log(100)        # CLIP clips the scale at 100 to keep training stable


@dataclass
class TrainTextEncoderConfig(TrainingConfig):
    # the shared settings: TrainingConfig (ldm/training/base_config.py); here the text encoder's own and defaults
    data: str = "shapes:2000@32"           # any ldm.data spec: folder, shards, parquet, COCO json, hf folder, shapes:N
    resolution: int = 32                   # the image side the image tower sees; a multiple of patch_size
    model: str = "small"                   # a preset (its text encoder, random init) or a folder with text_encoder/
                                           # (a model folder, a checkpoint or run of this command) to continue
    embed_dim: int = setting(128, "[2, 65536]")  # width of the shared embedding space both towers project into
    vision_width: int = setting(128, "[8, 65536]")  # width of the image tower, an open_clip ViT over the pixels
    vision_layers: int = setting(2, "[1, 1000]")  # the image tower's transformer blocks
    vision_head_width: int = setting(32, "[1, 65536]")  # the image tower's head width: vision_width // it heads,
                                                        # equal in width
    patch_size: int = setting(8, "[1, 8192]")  # the image tower's square patch side; resolution must be a multiple
    learning_rate: float = 5e-4
    weight_decay: float = setting(0.0, "[0, 10]")  # AdamW's, on matrices other than embeddings; 0 = none
    lr_scheduler: str = "cosine"           # any diffusers.optimization name (constant, cosine, linear, ...)
    lr_warmup_steps: int = 50
    batch_size: int = setting(64, "[2, 65536]")  # pairs per step and process: each text's negatives are the other
                                                 # images
    gradient_accumulation_steps: int = 1   # each micro-batch contrasts its own pairs (no larger negative pool)
    output_dir: str = setting("runs/text_encoder", flag="out")  # the run folder (checkpoints, the text encoder)
    log_every: int = setting(50, "[0, 1e9]")  # print the step's loss every this many steps; 0 = never
    validation_every: int = setting(100, "[0, 1e9]")  # held-out loss and retrieval accuracy; 0 = never (not even
                                                      # at the end)
    val_samples: int = setting(128, "[2, 1e5]", flag="num_validation_images")  # the first N pairs of the data,
                                                                               # held out of training
    num_workers: int = setting(0, "[0, 256]")

    def validate(self) -> None:
        """Raises ValueError naming the first bad setting and its fix."""
        super().validate()
        check_schedule(self.optimizer, self.lr_scheduler)
        if self.resolution % self.patch_size:
            raise ValueError(f"resolution {self.resolution} is not a multiple of patch_size {self.patch_size}; "
                             "change either (e.g. --resolution 32 --patch_size 8)")
        heads = self.vision_width // self.vision_head_width  # open_clip's head count
        if heads == 0 or self.vision_width % heads:
            raise ValueError(f"vision_width {self.vision_width} does not split into vision_width // "
                             f"vision_head_width = {heads} equal heads; choose a vision_head_width that divides it "
                             "(e.g. --vision_width 128 --vision_head_width 32)")


def find_text_encoder(path: str) -> tuple[str, str | None]:
    """Returns (the CLIPTextModel folder, the tokenizer folder or None) in `path`: a run of `ldm train-text-encoder`
    (its newest checkpoint), a checkpoint or model folder with text_encoder/ (and tokenizer/), or a text_encoder
    folder itself."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"text encoder folder {path} does not exist")
    checkpoints = list_checkpoints(path)
    folder = checkpoints[-1] if checkpoints else path
    for base in (folder, os.path.join(folder, "pipeline")):  # `ldm train` checkpoints keep the model in pipeline/
        if os.path.isfile(os.path.join(base, "text_encoder", "config.json")):
            tokenizer = os.path.join(base, "tokenizer")
            return os.path.join(base, "text_encoder"), tokenizer if os.path.isdir(tokenizer) else None
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder, None
    raise FileNotFoundError(f"{path} holds no text encoder (no text_encoder/config.json); pass the output_dir of "
                            "`ldm train-text-encoder`, one of its checkpoints, or a model folder with text_encoder/")


def load_text_encoder(path: str) -> tuple[CLIPTextModel, CLIPTokenizer | None]:
    """Returns the CLIPTextModel in `path` (see find_text_encoder) and its folder's tokenizer, or None."""
    encoder_dir, tokenizer_dir = find_text_encoder(path)
    encoder = CLIPTextModel.from_pretrained(encoder_dir, local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True) if tokenizer_dir else None
    return encoder, tokenizer


def context_width(denoiser) -> int:
    """Returns the width of the text token states a denoiser attends to."""
    config = denoiser.config
    for key in ("caption_channels", "encoder_hid_dim", "cross_attention_dim"):  # PixArt / UNet projection / direct
        if config.get(key):
            return int(config[key])
    raise ValueError(f"cannot tell the text width of {type(denoiser).__name__} from its config")


def check_text_width(text_encoder, denoiser, source: str) -> None:
    """Raises ValueError when the text encoder's states are not as wide as the denoiser's text input."""
    width, wanted = text_encoder.config.hidden_size, context_width(denoiser)
    if width != wanted:
        raise ValueError(f"the text encoder of {source} is {width} wide but the {type(denoiser).__name__} attends to "
                         f"{wanted}-wide text (cross_attention_dim); train a text encoder of width {wanted} "
                         f"(`ldm train-text-encoder --model` a preset whose text encoder is {wanted} wide), or use a "
                         f"--model whose cross-attention width is {width} (e.g. small for 128)")


def build_text_side(cfg: TrainTextEncoderConfig) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """Returns the text encoder to train and its tokenizer: a preset's (random init from cfg.seed) or a folder's."""
    if cfg.model in MODEL_PRESETS:
        spec = get_spec(cfg.model)
        torch.manual_seed(cfg.seed)
        return build_text_encoder(spec), build_clip_tokenizer(pad_token=spec.tokenizer_pad_token)
    if os.path.isdir(cfg.model):
        encoder, tokenizer = load_text_encoder(cfg.model)
        return encoder, tokenizer or build_clip_tokenizer()
    raise ValueError(f"model {cfg.model!r} is neither a preset ({', '.join(MODEL_PRESETS)}) nor a folder with "
                     "text_encoder/")


def build_image_tower(cfg: TrainTextEncoderConfig) -> nn.Module:
    """Returns an open_clip ViT over (B, 3, R, R) pixels in [-1, 1] whose output is (B, embed_dim)."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower  # open_clip's import is slow: only when used

    vision = CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, head_width=cfg.vision_head_width,
                           patch_size=cfg.patch_size, image_size=cfg.resolution)
    return _build_vision_tower(cfg.embed_dim, vision)


class ContrastivePair(nn.Module):
    """CLIP's two towers as one module call (DDP syncs gradients only through forward): image and text embeddings,
    unit length, and the logit scale."""

    def __init__(self, text_encoder: CLIPTextModel, image_tower: nn.Module, embed_dim: int):
        super().__init__()
        self.text_encoder, self.image_tower = text_encoder, image_tower
        width = text_encoder.config.hidden_size
        self.text_projection = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.text_projection.weight, std=width ** -0.5)  # CLIP's init of its text projection
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Returns the projected EOS states (B, embed_dim), unit length."""
        pooled = self.text_encoder(input_ids).pooler_output  # (B, D): the EOS token's final state
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor):
        """Returns (image embeddings (B, E), text embeddings (B, E), exp(logit scale))."""
        image = F.normalize(self.image_tower(pixel_values), dim=-1)  # (B, E)
        return image, self.encode_text(input_ids), self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Returns token ids (B, T) padded to the batch's longest caption: under the causal mask the states up to EOS
    are those of the full 77-token input a diffusion model passes, at a fraction of the cost."""
    return tokenizer(list(captions), padding="longest", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def without_keys(batch: dict, keys: set) -> dict:
    """Returns the batch without the samples whose key is in `keys` (tensors and lists alike)."""
    if not keys:
        return batch
    keep = [k not in keys for k in batch["key"]]
    index = torch.tensor([i for i, ok in enumerate(keep) if ok], dtype=torch.long)
    return {name: value[index] if isinstance(value, torch.Tensor) else [v for v, ok in zip(value, keep) if ok]
            for name, value in batch.items()}


def retrieval_hits(text: torch.Tensor, image: torch.Tensor, captions: list[str]) -> tuple[float, float]:
    """Returns (hits, chance hits) of text->image top-1 retrieval in one batch: a hit when the nearest image's
    caption equals the text; chance sums, per text, the share of images that would count."""
    nearest = (text @ image.T).argmax(dim=1).tolist()  # (B,)
    hits = sum(captions[j] == caption for j, caption in zip(nearest, captions))
    chance = sum(captions.count(caption) / len(captions) for caption in captions)
    return float(hits), chance


@torch.no_grad()
def evaluate(model: ContrastivePair, loss_fn, tokenizer, val: dict, batch_size: int, device) -> dict:
    """Returns {"val_loss", "val_retrieval", "val_chance"} over the held-out pairs, in batches of batch_size (a
    last batch of one pair is left out: retrieval among one image is no test)."""
    was_training = model.training
    model.eval()
    losses, hits, chance, count = [], 0.0, 0.0, 0
    for start in range(0, len(val["caption"]), batch_size):
        captions = list(val["caption"][start:start + batch_size])
        if len(captions) < 2:
            break
        pixels = val["pixel_values"][start:start + batch_size].to(device)
        image, text, scale = model(pixels, tokenize(tokenizer, captions).to(device))
        losses.append(float(loss_fn(image, text, scale)) * len(captions))
        batch_hits, batch_chance = retrieval_hits(text, image, captions)
        hits, chance, count = hits + batch_hits, chance + batch_chance, count + len(captions)
    model.train(was_training)
    return {"val_loss": sum(losses) / count, "val_retrieval": hits / count, "val_chance": chance / count}


def check_captions(captions: list[str]) -> None:
    """Raises ValueError when the held-out captions are all the same (nothing to contrast); prints a note when
    few are distinct."""
    distinct = len(set(captions))
    if distinct == 1:
        raise ValueError(f"all {len(captions)} held-out captions read {captions[0]!r}: with one caption for every "
                         "image there is nothing to contrast, and the text encoder learns nothing; give the data "
                         "varied captions (metadata.jsonl or .txt files per image), not one instance prompt")
    if distinct < len(captions) / 4:
        print(f"train_text_encoder: only {distinct} distinct captions among the {len(captions)} held-out pairs; "
              "identical captions in a batch are false negatives of the contrastive loss", flush=True)


class TextEncoderTrainer(loop.Trainer):
    """`ldm train-text-encoder`'s part of the loop: the contrastive loss of a batch (held-out pairs dropped), the
    held-out validation, and text_encoder/ + tokenizer/ in each checkpoint."""

    def __init__(self, cfg: TrainTextEncoderConfig, accelerator, tokenizer, stream, val: dict):
        from open_clip.loss import ClipLoss

        self.cfg, self.accelerator, self.tokenizer, self.stream = cfg, accelerator, tokenizer, stream
        self.batches, self.val, self.held_out = iter(stream), val, set(val.get("key", ()))
        self.loss_fn = ClipLoss()

    @property
    def pair(self) -> ContrastivePair:
        return self.accelerator.unwrap_model(self.model)

    def next_pairs(self) -> dict:
        batch = without_keys(next(self.batches), self.held_out)
        if len(batch["caption"]) < 2:
            raise ValueError(f"a training batch kept {len(batch['caption'])} pair(s) after leaving out the "
                             f"{len(self.held_out)} held-out ones: the data is hardly larger than val_samples; "
                             "lower --num-validation-images or add data")
        return batch

    def micro_loss(self, step: int, micro: int):
        batch, device = self.next_pairs(), self.accelerator.device
        generator = step_generator(self.cfg.seed, step, micro, self.accelerator.process_index)
        captions, _ = batch_captions(batch, None, None, generator)  # one of several captions per image, if any
        with self.accelerator.autocast():
            input_ids = tokenize(self.tokenizer, captions).to(device)  # (B, T)
            image, text, scale = self.model(batch["pixel_values"].to(device), input_ids)
            loss = self.loss_fn(image, text, scale)
        return loss, {"logit_scale": float(scale.detach())}

    def validate(self, state: dict) -> dict:
        record = {**evaluate(self.pair, self.loss_fn, self.tokenizer, self.val, self.cfg.batch_size,
                             self.accelerator.device), "step": state["step"]}
        self.accelerator.log(record, step=state["step"])
        self.accelerator.print(f"train_text_encoder step {state['step']}: " + describe(record))
        return record

    def write_extra(self, folder: str, state: dict) -> None:
        self.pair.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
        save_clip_tokenizer(self.tokenizer, os.path.join(folder, "tokenizer"))
        save_config(self.cfg, os.path.join(folder, "config.yaml"))
        with open(os.path.join(folder, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(state["history"][-1] if state["history"] else {}, f, indent=2)  # the latest validation

    def data_position(self):
        return self.stream.position()

    def seek(self, position) -> None:
        self.stream.seek(position)


def describe(record: dict) -> str:
    return (f"val_loss {record['val_loss']:.4f}, val_retrieval {record['val_retrieval']:.3f} "
            f"(chance {record['val_chance']:.3f})")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Returns AdamW parameter groups: weight decay on matrices, none on embeddings (the token table's scale is part
    of the preset), norms, biases and the logit scale (as open_clip)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def open_pairs(cfg: TrainTextEncoderConfig, rank: int, world: int, dataset=None, val_dataset=None):
    """Returns (training data, held-out batch): ldm.data's for cfg.data, or `dataset` (samples with "pixel_values",
    "caption", "key"); the held-out pairs are the first val_samples of `val_dataset`, or of the data unshuffled."""
    if dataset is None:
        from ldm.data import open_dataset

        dataset = open_dataset(cfg.data, resolution=cfg.resolution, rank=rank, world_size=world, seed=cfg.seed)
        if val_dataset is None:
            val_dataset = open_dataset(cfg.data, resolution=cfg.resolution, shuffle=False, seed=cfg.seed)
    val = first_samples(dataset if val_dataset is None else val_dataset, cfg.val_samples)
    check_captions(list(val["caption"]))
    return dataset, val


def setup(cfg: TrainTextEncoderConfig, accelerator, dataset=None, val_dataset=None) -> TextEncoderTrainer:
    """Builds both towers, the optimiser and the data, prepares them with Accelerate; returns the trainer."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    text_encoder, tokenizer = build_text_side(cfg)
    model = ContrastivePair(text_encoder, build_image_tower(cfg), cfg.embed_dim).train().to(device)
    optimizer = loop.make_optimizer(decay_groups(model, cfg.weight_decay), cfg.learning_rate, device,
                                    betas=(0.9, 0.98), eps=1e-6,  # CLIP's betas and eps (Radford et al. 2021)
                                    kind=cfg.optimizer, warmup_steps=cfg.lr_warmup_steps, d_coef=cfg.prodigy_d_coef)
    lr_scheduler = loop.make_lr_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, cfg.max_steps, world)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    train_data, val = open_pairs(cfg, rank, world, dataset, val_dataset)
    stream = BatchStream(train_data, cfg.batch_size, rank, world, cfg.seed, cfg.num_workers)
    trainer = TextEncoderTrainer(cfg, accelerator, tokenizer, stream, val)
    trainer.model, trainer.params = model, list(model.parameters())
    trainer.optimizer, trainer.lr_scheduler = optimizer, lr_scheduler
    return trainer


def main(cfg: TrainTextEncoderConfig, dataset=None, val_dataset=None) -> dict:
    """Trains and returns {"step", "losses", "initial" (validation before training; {} on resume), "history",
    "text_encoder_dir" (a folder with text_encoder/ and tokenizer/), "checkpoint", "stopped_by",
    "nonfinite_total"}. `dataset` replaces cfg.data; `val_dataset` the held-out pairs."""
    accelerator = loop.make_accelerator(cfg, cfg.output_dir)
    if accelerator.is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        print(f"train_text_encoder config:\n{format_config(cfg)}", flush=True)
    set_seed(cfg.seed)
    trainer = setup(cfg, accelerator, dataset, val_dataset)
    initial = {}
    if resolve_resume(cfg.resume, cfg.output_dir) is None:
        initial = evaluate(trainer.pair, trainer.loss_fn, trainer.tokenizer, trainer.val, cfg.batch_size,
                           accelerator.device)
        accelerator.print("train_text_encoder before training: " + describe(initial))
    settings = loop.LoopSettings.from_config(cfg, name="train_text_encoder", print_logs=True)
    result = loop.train(accelerator, trainer, settings)
    accelerator.print(where_written("train_text_encoder", "text encoder folder",
                                    result["checkpoint"], cfg.output_dir))
    return {"step": result["step"], "losses": result["losses"], "initial": initial, "history": result["history"],
            "text_encoder_dir": result["checkpoint"], "checkpoint": result["checkpoint"],
            "stopped_by": result["stopped_by"], "nonfinite_total": result["nonfinite_total"]}
