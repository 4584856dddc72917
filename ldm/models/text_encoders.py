"""Two text encoders behind one interface: `encoder(input_ids, output_hidden_states=...)` returns an output
whose [0] is the (B, 77, D) sequence the UNet attends to, and `.final_layer_norm` exists (for clip_skip).

- transformers `CLIPTextModel`: Stable Diffusion 1.x (OpenAI CLIP ViT-L/14, last layer), used as is.
- `OpenCLIPTextEncoder`: an open_clip text tower read at its penultimate layer and passed through ln_final,
  as Stable Diffusion 2.x does (FrozenOpenCLIPEmbedder, layer="penultimate"). `to_clip_text_model()` turns
  it into the equivalent CLIPTextModel (one layer fewer), which is what SD 2.x folders store.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

LAYERS = {"last": 0, "penultimate": 1}


class OpenCLIPTextEncoder(nn.Module):
    """An open_clip TextTransformer whose output is a hidden layer's token sequence, not the pooled embedding."""

    def __init__(self, text_cfg: dict, embed_dim: int, layer: str = "penultimate", quick_gelu: bool = False):
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower  # open_clip's import is slow: only when used

        if layer not in LAYERS:
            raise ValueError(f"layer={layer!r} must be one of {list(LAYERS)}")
        self.tower = _build_text_tower(embed_dim, CLIPTextCfg(**text_cfg), quick_gelu=quick_gelu)
        self.text_cfg, self.embed_dim, self.layer, self.quick_gelu = dict(text_cfg), embed_dim, layer, quick_gelu

    @classmethod
    def from_config(cls, model: str | dict = "ViT-H-14", layer: str = "penultimate") -> "OpenCLIPTextEncoder":
        """Returns a randomly initialised tower for an open_clip model name (ViT-H-14 = SD 2.x) or a config dict
        {"embed_dim": int, "text_cfg": {...}, "quick_gelu": bool} as in open_clip's model_configs/*.json."""
        config = model
        if isinstance(model, str):
            import open_clip

            config = open_clip.get_model_config(model)
            if config is None:
                raise ValueError(f"open_clip has no model config {model!r}; see open_clip.list_models()")
        return cls(config["text_cfg"], config["embed_dim"], layer, quick_gelu=config.get("quick_gelu", False))

    @classmethod
    def from_pretrained(cls, weights: str, model: str | dict = "ViT-H-14", layer: str = "penultimate",
                        allow_pickle: bool = False) -> "OpenCLIPTextEncoder":
        """Returns the tower with text weights read from a local open_clip checkpoint (full CLIP or text only)."""
        from ldm.folders import load_state_dict

        encoder = cls.from_config(model, layer)
        state = load_state_dict(weights, allow_pickle=allow_pickle)
        state = {k.removeprefix("text."): v for k, v in state.items()}
        wanted = encoder.tower.state_dict()
        missing = [k for k in wanted if k not in state and k != "attn_mask"]
        if missing:
            raise ValueError(f"{weights} lacks text-tower weights for {model} (e.g. {missing[:3]}); "
                             "is it an open_clip checkpoint of that model?")
        encoder.tower.load_state_dict({k: state[k] for k in wanted if k in state}, strict=False)
        return encoder

    @property
    def final_layer_norm(self) -> nn.Module:
        return self.tower.ln_final

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.token_embedding.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask=None, output_hidden_states: bool = False):
        """Returns BaseModelOutputWithPooling: last_hidden_state (B, T, D) = ln_final(chosen layer's output)."""
        tower = self.tower
        x = tower.token_embedding(input_ids) + tower.positional_embedding[: input_ids.shape[1]]  # (B, T, D)
        mask = tower.attn_mask[: input_ids.shape[1], : input_ids.shape[1]] if tower.attn_mask is not None else None
        blocks = tower.transformer.resblocks
        hidden = [x]
        for block in blocks[: len(blocks) - LAYERS[self.layer]]:
            x = block(x, attn_mask=mask)
            hidden.append(x)
        return BaseModelOutputWithPooling(last_hidden_state=tower.ln_final(x),
                                          hidden_states=tuple(hidden) if output_hidden_states else None)

    def to_clip_text_model(self, pad_token_id: int = 0) -> CLIPTextModel:
        """Returns a transformers CLIPTextModel computing the same sequence output (SD 2.x's folder format)."""
        cfg, width = self.text_cfg, self.text_cfg["width"]
        layers = len(self.tower.transformer.resblocks) - LAYERS[self.layer]
        config = CLIPTextConfig(vocab_size=cfg.get("vocab_size", 49408), hidden_size=width,
                                intermediate_size=int(width * cfg.get("mlp_ratio", 4.0)), num_hidden_layers=layers,
                                num_attention_heads=cfg["heads"], max_position_embeddings=cfg.get("context_length", 77),
                                hidden_act="quick_gelu" if self.quick_gelu else "gelu", layer_norm_eps=1e-5,
                                projection_dim=self.embed_dim, pad_token_id=pad_token_id, bos_token_id=49406,
                                eos_token_id=49407)
        model = CLIPTextModel(config)
        missing, unexpected = model.load_state_dict(openclip_to_hf_text(self.tower.state_dict(), layers), strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        return model.to(self.dtype)


def openclip_to_hf_text(state: dict, layers: int) -> dict:
    """Returns transformers CLIPTextModel keys for an open_clip text tower's state dict (first `layers` blocks)."""
    out = {"embeddings.token_embedding.weight": state["token_embedding.weight"],
           "embeddings.position_embedding.weight": state["positional_embedding"],
           "final_layer_norm.weight": state["ln_final.weight"], "final_layer_norm.bias": state["ln_final.bias"]}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = state[src + "attn.in_proj_weight"].chunk(3)  # (3D, D) -> 3 x (D, D)
        qb, kb, vb = state[src + "attn.in_proj_bias"].chunk(3)
        pairs = {"self_attn.q_proj": (q, qb), "self_attn.k_proj": (k, kb), "self_attn.v_proj": (v, vb)}
        for name, (w, b) in pairs.items():
            out[dst + name + ".weight"], out[dst + name + ".bias"] = w, b
        for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[dst + ours + ".weight"] = state[src + theirs + ".weight"]
            out[dst + ours + ".bias"] = state[src + theirs + ".bias"]
    return out
