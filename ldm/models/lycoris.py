"""Kohya / LyCORIS files of every --lora-type: what AUTOMATIC1111 and ComfyUI load, written and read back.

    state = to_lycoris(unet, text_encoder)             # {"lora_unet_<module>.<part>": tensor}
    save_webui_lora("out/lora.safetensors", unet, text_encoder)   # ldm.models.lora: that state + ss_* metadata
    load_lycoris({"unet": unet, "text_encoder": te}, state, adapter_name="style")   # peft adapters again

Parts per layer "lora_unet_<module>" (LyCORIS lycoris/modules/{locon,loha,lokr}.py, ComfyUI comfy/weight_adapter/):
    lora, locon  .lora_down.weight (r, in[, k, k])  .lora_up.weight (out, r[, 1, 1])     .alpha
    dora         the same + .dora_scale (out, 1[, 1, 1])
    loha         .hada_w1_a (out, r) .hada_w1_b (r, in*k*k) .hada_w2_a .hada_w2_b          .alpha
    lokr         .lokr_w1 (or .lokr_w1_a/_b) .lokr_w2 (or .lokr_w2_a/_b)                   .alpha
A layer's delta is (alpha / r) up @ down (LoRA), (alpha / r) (w1_a w1_b) * (w2_a w2_b) (LoHa, Hadamard product) or
kron(w1, w2) (LoKr; alpha / r when a factor is low-rank). peft's own alpha / r is folded into up, hada_w1_a or w1
and the file says alpha = r, so every loader applies the weights as trained whatever alpha rule it follows.

DoRA (Liu et al. 2024, arXiv:2402.09353, Eq. 5) trains W' = m (W + dW) / ||W + dW|| with one magnitude per output
channel (peft's lora_magnitude_vector). ComfyUI reads a dora_scale of out rows as that per-output magnitude but
divides by the norm of the base weight, ||W|| (comfy/weight_adapter/base.py: weight_decompose): the file holds
m ||W|| / ||W + dW|| so that ComfyUI computes peft's W' exactly, and load_lycoris undoes it.
"""
from __future__ import annotations

import json
import re

import torch

from ldm.models.lora import kohya_module_name, lora_type_of

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
LYCORIS_PARTS = (".hada_w1_a", ".lokr_w1", ".dora_scale")  # a layer part only LyCORIS-type files have


def adapted_layers(module):
    """Yields (module path, peft layer) for every adapted layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in module.named_modules():
        if isinstance(layer, BaseTunerLayer) and layer.active_adapters:
            yield name, layer


def _dora_row_norm(weight: torch.Tensor) -> torch.Tensor:
    """Returns each output channel's norm, shaped to broadcast against weight: (out, 1[, 1, 1])."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))


def _lora_delta(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:
    """Returns up @ down as a weight of `shape`: (out, r[,1,1]) x (r, in[, k, k]) -> (out, in[, k, k])."""
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


def _layer_parts(layer) -> dict[str, torch.Tensor]:
    """Returns one peft layer's adapter as LyCORIS parts, with peft's alpha / r folded in and alpha = r."""
    adapter = layer.active_adapters[0]
    scale = float(layer.scaling[adapter])
    if hasattr(layer, "hada_w1_a"):  # LoHa: w1_a carries the scale
        parts = {f"hada_{n}": getattr(layer, f"hada_{n}")[adapter] for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
        parts["hada_w1_a"] = parts["hada_w1_a"] * scale
        rank = parts["hada_w1_b"].shape[0]
    elif hasattr(layer, "lokr_w1"):  # LoKr: w1 (or its factor w1_a) carries the scale
        if adapter in layer.lokr_t2:
            raise ValueError("LoKr with a Tucker conv core (use_effective_conv2d) has no kohya file format here")
        parts = {n: getattr(layer, n)[adapter] for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                           "lokr_w2_a", "lokr_w2_b") if adapter in getattr(layer, n)}
        first = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
        parts[first] = parts[first] * scale
        rank = layer.r[adapter]
    else:  # LoRA, LoCon, DoRA: up carries the scale
        down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight * scale
        parts = {"lora_down.weight": down, "lora_up.weight": up}
        rank = down.shape[0]
        if layer.use_dora.get(adapter):
            weight = layer.get_base_layer().weight.float()
            adapted = weight + _lora_delta(up.float(), down.float(), weight.shape)
            magnitude = layer.lora_magnitude_vector[adapter].weight.reshape(_dora_row_norm(weight).shape)
            parts["dora_scale"] = magnitude * _dora_row_norm(weight) / _dora_row_norm(adapted)
    parts["alpha"] = torch.tensor(float(rank))
    return {k: v.detach().float().cpu().contiguous() for k, v in parts.items()}


def to_lycoris(unet, text_encoder=None, text_encoder_2=None) -> dict[str, torch.Tensor]:
    """Returns every adapted layer of the UNet and text encoder(s) under kohya / LyCORIS names (module docstring)."""
    state = {}
    for component, module in zip(COMPONENTS, (unet, text_encoder, text_encoder_2)):
        if module is None or lora_type_of(module) is None:
            continue
        for path, layer in adapted_layers(module):
            name = kohya_module_name(component, path, unet.config)
            state.update({f"{name}.{part}": value for part, value in _layer_parts(layer).items()})
    return state


def network_info(kind: str) -> dict[str, str]:
    """Returns the ss_network_* metadata kohya / LyCORIS write for an adapter type (kohya-ss networks.lora;
    lycoris.kohya with algo=...)."""
    if kind == "lora":
        return {"ss_network_module": "networks.lora"}
    algo = {"dora": "lora", "locon": "locon"}.get(kind, kind)
    args = {"algo": algo, **({"dora_wd": "True"} if kind == "dora" else {})}
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


def is_lycoris_file(keys) -> bool:
    """Returns whether a kohya-style state needs load_lycoris: LoHa, LoKr or DoRA parts, or conv (LoCon) layers
    (given as {key: shape})."""
    return any(k.endswith(LYCORIS_PARTS) for k in keys) or any(
        k.endswith(".lora_down.weight") and len(shape) == 4 for k, shape in keys.items())


def module_table(modules: dict, unet_config) -> dict[str, tuple[str, str]]:
    """Returns {kohya name: (component, module path)} of every Linear / Conv2d layer of the given modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    table = {}
    for component, module in modules.items():
        for path, layer in module.named_modules():
            inner = ".base_layer" in path or ".lora_" in path  # a peft wrapper's own sub-layers
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d, BaseTunerLayer)) and "." in path and not inner:
                try:
                    table[kohya_module_name(component, path, unet_config)] = (component, path)
                except ValueError:  # a layer no kohya name covers (conv_in, time embedding): no file names it
                    pass
    return table


def _group(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Returns {kohya layer name: {part: tensor}} ("lora_unet_x.alpha" -> "lora_unet_x", "alpha")."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        layers.setdefault(name, {})[part] = value
    return layers


def _kind(parts: dict) -> str:
    if "hada_w1_a" in parts:
        return "loha"
    if any(p.startswith("lokr_") for p in parts):
        return "lokr"
    return "dora" if "dora_scale" in parts else "lora"


def _peft_layer(kind: str, parts: dict, weight: torch.Tensor) -> tuple[int, float, dict[str, torch.Tensor]]:
    """Returns (peft rank, peft alpha, peft parameters by name) of one file layer on base weight `weight`."""
    if kind == "loha":
        rank = parts["hada_w1_b"].shape[0]
        alpha = float(parts.get("alpha", torch.tensor(float(rank))))
        return rank, alpha, {f"hada_{n}": parts[f"hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b")}
    if kind == "lokr":  # ComfyUI: alpha / dim when a factor is low-rank (dim = its rank), else 1
        factor = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        if factor is None:  # both factors full: any rank >= max(w2's sides) / 2 makes peft keep w2 full
            rank = max(parts["lokr_w2"].shape[:2])
            return rank, float(rank), {k: v for k, v in parts.items() if k.startswith("lokr_")}
        rank = factor.shape[0]
        return rank, float(parts.get("alpha", torch.tensor(float(rank)))), {
            k: v for k, v in parts.items() if k.startswith("lokr_")}
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = down.shape[0]
    alpha = float(parts.get("alpha", torch.tensor(float(rank))))
    state = {"lora_A.weight": down, "lora_B.weight": up}
    if kind == "dora":  # the file's dora_scale is m ||W|| / ||W + dW|| (module docstring): back to m
        adapted = weight + _lora_delta(up.float() * alpha / rank, down.float(), weight.shape)
        magnitude = parts["dora_scale"].float() * _dora_row_norm(adapted) / _dora_row_norm(weight)
        state["lora_magnitude_vector"] = magnitude.flatten()
    return rank, alpha, state


def _config(kind: str, layers: dict[str, tuple[int, float]], decompose_both: bool):
    """Returns the peft config adapting exactly `layers` ({module path: (rank, alpha)})."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    ranks = [r for r, _ in layers.values()]
    rank = max(set(ranks), key=ranks.count)
    alpha = next(a for r, a in layers.values() if r == rank)
    common = dict(r=rank, target_modules=sorted(layers),
                  rank_pattern={re.escape(p): r for p, (r, _) in layers.items() if r != rank},
                  alpha_pattern={re.escape(p): a for p, (_, a) in layers.items() if a != alpha})
    if kind == "loha":
        return LoHaConfig(alpha=alpha, **common)
    if kind == "lokr":
        return LoKrConfig(alpha=alpha, decompose_both=decompose_both, **common)
    return LoraConfig(lora_alpha=alpha, use_dora=kind == "dora", **common)


def load_lycoris(modules: dict, state: dict[str, torch.Tensor], adapter_name: str, unet_config) -> None:
    """Adds adapter `adapter_name` to each module of `modules` ({"unet": ..., "text_encoder": ...}) from a kohya /
    LyCORIS state dict of one type, through peft (add_adapter, then set_peft_model_state_dict)."""
    from peft.utils import set_peft_model_state_dict

    table = module_table(modules, unet_config)
    layers = _group(state)
    unknown = sorted(name for name in layers if name not in table)
    if unknown:
        raise ValueError(f"this LoRA names {len(unknown)} layers the model does not have (e.g. {unknown[0]}): it was "
                         "trained on another model; load a LoRA trained on this one")
    kinds = {_kind(parts) for parts in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"this file mixes adapter types {sorted(kinds)}; ldm loads one type per file")
    kind = kinds.pop()
    for component, module in modules.items():
        names = [n for n in layers if table[n][0] == component]
        if not names:
            continue
        found, peft_state = {}, {}
        for name in names:
            path = table[name][1]
            weight = module.get_submodule(path).weight.detach().float()
            rank, alpha, params = _peft_layer(kind, layers[name], weight)
            found[path] = (rank, alpha)
            peft_state.update({f"{path}.{k}": v for k, v in params.items()})
        decompose_both = any("lokr_w1_a" in layers[n] for n in names)
        module.add_adapter(_config(kind, found, decompose_both), adapter_name=adapter_name)
        result = set_peft_model_state_dict(module, peft_state, adapter_name=adapter_name)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{component}: peft did not place {result.unexpected_keys[:3]}: the file's factor "
                             "shapes differ from peft's for these layers")


def load_lycoris_file(pipe, source, adapter_name: str, weight_name: str | None = None) -> None:
    """Loads a kohya / LyCORIS file (or folder, or state dict) onto the pipeline's UNet and text encoder(s)."""
    import os

    from ldm.folders import load_state_dict
    from ldm.models.lora import lora_path

    if isinstance(source, dict):
        state = source
    elif os.path.isdir(source) and weight_name:
        state = load_state_dict(os.path.join(source, weight_name))
    else:
        state = load_state_dict(lora_path(str(source)))
    modules = {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}
    load_lycoris(modules, state, adapter_name, pipe.unet.config)
