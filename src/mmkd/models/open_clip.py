"""open_clip checkpoints (``open_clip_config.json`` + weights, as published on the hub) as transformers' CLIPModel.

open_clip's standard ViT CLIP (OpenAI's layout: pre-LN blocks, fused q/k/v ``in_proj_weight``, CLS-token image
pooling, causal text tower pooled at the EOT token = the largest token id) is transformers' ``CLIPModel`` with
other parameter names, so its weights convert exactly. Everything else (timm or Hugging Face towers, attentional
pooling, layer scale, no pre-LN, ...) computes something CLIPModel cannot, and is refused naming the config key.
No open_clip_torch at run time (it pulls torchvision, which does not match our torch); nothing read runs code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

from mmkd.models.dual_encoder import CLIP_MEAN, CLIP_STD
from mmkd.models.model_files import ModelLoadError, check_tokenizer, load_plain_tokenizer, load_weights_file

PREFIX = "open_clip:"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
TOKENIZER_OPTION = "?tokenizer="
# transformers' CLIPTextModel pools at the largest token id (open_clip's "argmax") only for this legacy eos id
ARGMAX_EOS_ID = 2

_ABSENT = object()
# key -> value that maps (anything else is refused); keys absent from these tables must be falsy to map
VISION_FIXED: dict[str, Any] = {
    "timm_model_name": None, "attentional_pool": False, "no_ln_pre": False, "ls_init_value": None,
    "pool_type": "tok", "pos_embed_type": "learnable", "act_kwargs": None, "norm_kwargs": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False,
}
TEXT_FIXED: dict[str, Any] = {
    "hf_model_name": None, "pool_type": "argmax", "embed_cls": False, "no_causal_mask": False,
    "ls_init_value": None, "proj_bias": False, "proj_type": "linear", "act_kwargs": None, "norm_kwargs": None,
    "norm_type": "layernorm", "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
}
MODEL_FIXED: dict[str, Any] = {"init_logit_bias": None, "multimodal_cfg": None, "nonscalar_logit_scale": False}
# settings that change nothing CLIPModel computes at inference (training-only, or per-token ops that commute
# with CLS/EOT pooling, or tokenizer hints: the tokenizer comes from the folder or the ?tokenizer= option)
VISION_FREE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
               "output_tokens", "final_ln_after_pool", "attn_pooler_queries", "attn_pooler_heads",
               "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "output_tokens",
             "final_ln_after_pool", "pad_id", "eos_id", "hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode",
             "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
MODEL_FREE = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "cast_dtype", "init_logit_scale"}
WHY = {
    "timm_model_name": "a timm image tower", "hf_model_name": "a Hugging Face text tower",
    "attentional_pool": "attentional pooling (attn_pool)", "no_ln_pre": "no LayerNorm before the image blocks",
    "ls_init_value": "layer scale", "pool_type": "another pooling", "layers": "a ModifiedResNet image tower",
    "init_logit_bias": "a sigmoid (SigLIP) head", "multimodal_cfg": "a CoCa text decoder",
    "embed_cls": "a text CLS token", "no_causal_mask": "a text tower without causal mask",
}


@dataclass
class OpenClipCheckpoint:
    """A converted checkpoint: the CLIPModel and what preprocessing/tokenisation it was trained with."""

    model: CLIPModel
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    context_length: int
    tokenizer: Any


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """``open_clip:FOLDER`` or ``open_clip:FOLDER?tokenizer=TOKENIZER`` -> (folder, tokenizer or None)."""
    rest = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    folder, _, tok = rest.partition(TOKENIZER_OPTION)
    if not folder:
        raise ModelLoadError(f"{spec!r}: open_clip: needs the checkpoint folder, e.g. open_clip:models/ViT-B-32")
    return Path(folder), tok or None


def read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ModelLoadError(f"open_clip:{folder}: no such folder; download the open_clip checkpoint (its "
                             f"{CONFIG_FILE} and weights) and pass its folder")
    f = folder / CONFIG_FILE
    if not f.is_file():
        raise ModelLoadError(f"{folder} has no {CONFIG_FILE}; open_clip:FOLDER needs open_clip's hub layout "
                             f"({CONFIG_FILE} + {' or '.join(WEIGHT_FILES)})")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise ModelLoadError(f"{f}: no model_cfg object; it is not an open_clip config")
    return cfg


def _check_section(section: dict[str, Any], fixed: dict[str, Any], free: set[str], where: str, f: Path) -> None:
    for key, value in section.items():
        want = fixed.get(key, _ABSENT)
        if want is _ABSENT and key in free:
            continue
        maps = (value in (None, False, "default") or value == {}) if want in (None, False, _ABSENT) else value == want
        if not maps:
            what = WHY.get(key, "a setting CLIPModel has no equivalent for")
            raise ModelLoadError(f"{f}: {where}{key} = {json.dumps(value)} ({what}) does not map to transformers' "
                                 "CLIPModel; only standard ViT CLIP towers (quick-GELU or GELU) convert")


def check_mappable(cfg: dict[str, Any], f: Path) -> None:
    """Refuse, naming the key, any architecture CLIPModel does not compute exactly."""
    mc = cfg["model_cfg"]
    _check_section(mc, MODEL_FIXED, MODEL_FREE, "model_cfg.", f)
    for name in ("vision_cfg", "text_cfg"):
        if not isinstance(mc.get(name), dict):
            raise ModelLoadError(f"{f}: model_cfg.{name} is missing; it is not an open_clip CLIP config")
    vc, tc = mc["vision_cfg"], mc["text_cfg"]
    if isinstance(vc.get("layers"), (list, tuple)):
        raise ModelLoadError(f"{f}: model_cfg.vision_cfg.layers = {vc['layers']} ({WHY['layers']}) does not map to "
                             "transformers' CLIPModel; only standard ViT CLIP towers convert")
    _check_section(vc, VISION_FIXED, VISION_FREE, "model_cfg.vision_cfg.", f)
    _check_section(tc, TEXT_FIXED, TEXT_FREE, "model_cfg.text_cfg.", f)
    for key in ("image_size", "patch_size"):
        v = vc.get(key)
        if isinstance(v, (list, tuple)) and len(set(v)) != 1:
            raise ModelLoadError(f"{f}: model_cfg.vision_cfg.{key} = {v} is not square; CLIPModel needs square "
                                 "images and patches")
    width, head_width = int(vc.get("width", 768)), int(vc.get("head_width", 64))
    if width % head_width:
        raise ModelLoadError(f"{f}: model_cfg.vision_cfg.width {width} is not a multiple of head_width {head_width}")


def _square(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def quick_gelu(cfg: dict[str, Any]) -> bool:
    """open_clip's ``quick_gelu`` flag, or a ``-quickgelu`` model name where the config carries one."""
    name = str(cfg.get("model_name") or cfg["model_cfg"].get("model_name") or "")
    return bool(cfg["model_cfg"].get("quick_gelu", False)) or name.endswith("-quickgelu")


def clip_config(cfg: dict[str, Any]) -> CLIPConfig:
    """The CLIPConfig computing what open_clip's model_cfg does (open_clip's defaults where a key is absent)."""
    mc = cfg["model_cfg"]
    vc, tc = mc["vision_cfg"], mc["text_cfg"]
    act = "quick_gelu" if quick_gelu(cfg) else "gelu"  # transformers' "gelu" is torch's exact nn.GELU
    vw, tw = int(vc.get("width", 768)), int(tc.get("width", 512))
    vision = dict(hidden_size=vw, num_hidden_layers=int(vc.get("layers", 12)),
                  num_attention_heads=vw // int(vc.get("head_width", 64)),
                  intermediate_size=int(vw * float(vc.get("mlp_ratio", 4.0))),
                  image_size=_square(vc.get("image_size", 224)), patch_size=_square(vc.get("patch_size", 16)),
                  hidden_act=act, layer_norm_eps=1e-5)
    text = dict(hidden_size=tw, num_hidden_layers=int(tc.get("layers", 12)),
                num_attention_heads=int(tc.get("heads", 8)),
                intermediate_size=int(tw * float(tc.get("mlp_ratio", 4.0))),
                vocab_size=int(tc.get("vocab_size", 49408)), max_position_embeddings=int(tc.get("context_length", 77)),
                hidden_act=act, layer_norm_eps=1e-5, eos_token_id=ARGMAX_EOS_ID, bos_token_id=None, pad_token_id=0)
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=int(mc.get("embed_dim", 512)))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    f = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if f is None:
        raise ModelLoadError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)}); copy the weights file of the "
                             "open_clip checkpoint too")
    state = load_weights_file(f)  # a damaged file, or a pickle holding more than tensors: one line naming it
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{f} is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _block(take: Any, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    """One ResidualAttentionBlock (ln_1, fused-qkv attn, ln_2, mlp c_fc/c_proj) as a CLIPEncoderLayer."""
    for name, t in zip("qkv", take(f"{src}.attn.in_proj_weight").chunk(3)):
        out[f"{dst}.self_attn.{name}_proj.weight"] = t
    for name, t in zip("qkv", take(f"{src}.attn.in_proj_bias").chunk(3)):
        out[f"{dst}.self_attn.{name}_proj.bias"] = t
    for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        out[f"{dst}.{b}.weight"] = take(f"{src}.{a}.weight")
        out[f"{dst}.{b}.bias"] = take(f"{src}.{a}.bias")


def to_clip_state_dict(state: dict[str, torch.Tensor], config: CLIPConfig, text_prefix: str,
                       where: Path) -> dict[str, torch.Tensor]:
    """open_clip's parameter names and layouts -> CLIPModel's; every open_clip tensor is used exactly once."""
    left = dict(state)
    for k in ("attn_mask", f"{text_prefix}attn_mask"):  # a non-persistent buffer some old saves hold
        left.pop(k, None)
    if "logit_bias" in left:
        raise ModelLoadError(f"{where}: the weights hold logit_bias (a sigmoid, SigLIP-style head), which "
                             "transformers' CLIPModel has no place for")

    def take(key: str) -> torch.Tensor:
        if key not in left:
            raise ModelLoadError(f"{where}: weights lack {key}, which a standard open_clip ViT CLIP holds; the "
                                 "weights do not fit open_clip_config.json")
        return left.pop(key)

    out: dict[str, torch.Tensor] = {}
    v, t = "vision_model", "text_model"
    out[f"{v}.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out[f"{v}.embeddings.class_embedding"] = take("visual.class_embedding")
    out[f"{v}.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[f"{v}.{b}.weight"] = take(f"visual.{a}.weight")
        out[f"{v}.{b}.bias"] = take(f"visual.{a}.bias")
    for i in range(config.vision_config.num_hidden_layers):
        _block(take, f"visual.transformer.resblocks.{i}", f"{v}.encoder.layers.{i}", out)
    out["visual_projection.weight"] = take("visual.proj").t()  # open_clip: x @ proj, [width, embed_dim]
    p = text_prefix
    out[f"{t}.embeddings.token_embedding.weight"] = take(f"{p}token_embedding.weight")
    out[f"{t}.embeddings.position_embedding.weight"] = take(f"{p}positional_embedding")
    for i in range(config.text_config.num_hidden_layers):
        _block(take, f"{p}transformer.resblocks.{i}", f"{t}.encoder.layers.{i}", out)
    out[f"{t}.final_layer_norm.weight"] = take(f"{p}ln_final.weight")
    out[f"{t}.final_layer_norm.bias"] = take(f"{p}ln_final.bias")
    out["text_projection.weight"] = take(f"{p}text_projection").t()
    out["logit_scale"] = take("logit_scale").reshape(())
    if left:
        raise ModelLoadError(f"{where}: weights hold {len(left)} tensor(s) a standard ViT CLIP does not "
                             f"(e.g. {', '.join(sorted(left)[:3])}); this architecture does not map to CLIPModel")
    return {k: v.contiguous() for k, v in out.items()}


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / n).is_file() for n in TOKENIZER_FILES)


def find_tokenizer(folder: Path, tokenizer: str | None, cfg: dict[str, Any], vocab_size: int) -> Any:
    """The folder's own tokenizer files, else the one named by ``?tokenizer=`` (or the API's tokenizer_path)."""
    if tokenizer is not None and tokenizer.startswith(PREFIX):  # ?tokenizer=open_clip:OTHER
        tok = open_clip_tokenizer(tokenizer)
    elif tokenizer is not None:
        tok = load_plain_tokenizer(tokenizer, where=f"{tokenizer} (the tokenizer of open_clip:{folder})")
    elif has_tokenizer_files(folder):
        tok = load_plain_tokenizer(folder, where=f"open_clip:{folder}")
    else:
        hint = cfg["model_cfg"]["text_cfg"].get("hf_tokenizer_name") or "openai/clip-vit-base-patch32"
        raise ModelLoadError(f"open_clip:{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); name one "
                             f"with open_clip:{folder}{TOKENIZER_OPTION}TOKENIZER_FOLDER (open_clip's default is "
                             f"OpenAI's CLIP BPE, e.g. the tokenizer files of {hint}), or copy them into the folder")
    check_tokenizer(tok, f"open_clip:{folder}")
    if len(tok) > vocab_size:
        raise ModelLoadError(f"the tokenizer of open_clip:{folder} has {len(tok)} tokens but the model's "
                             f"text_cfg.vocab_size is {vocab_size}: it is not this model's tokenizer (open_clip's "
                             "default is OpenAI's CLIP BPE, 49408 tokens)")
    return tok


def _preprocess(cfg: dict[str, Any], f: Path) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    pc = cfg.get("preprocess_cfg") or {}
    try:
        mean = tuple(float(x) for x in pc.get("mean", CLIP_MEAN))
        std = tuple(float(x) for x in pc.get("std", CLIP_STD))
    except (TypeError, ValueError):
        raise ModelLoadError(f"{f}: preprocess_cfg.mean/std must be three numbers each") from None
    if len(mean) != 3 or len(std) != 3:
        raise ModelLoadError(f"{f}: preprocess_cfg.mean/std must be three numbers each, got {list(mean)}, {list(std)}")
    return mean, std  # type: ignore[return-value]


def load_open_clip(spec: str, tokenizer_path: str | None = None) -> OpenClipCheckpoint:
    """``open_clip:FOLDER[?tokenizer=T]`` as a CLIPModel; refused in one line where it does not map exactly."""
    folder, tok_option = parse_spec(spec)
    cfg = read_config(folder)
    f = folder / CONFIG_FILE
    check_mappable(cfg, f)
    mean, std = _preprocess(cfg, f)
    config = clip_config(cfg)
    state = read_weights(folder)
    text_prefix = "text." if cfg["model_cfg"].get("custom_text") else ""
    converted = to_clip_state_dict(state, config, text_prefix, folder)
    tokenizer = find_tokenizer(folder, tokenizer_path or tok_option, cfg, config.text_config.vocab_size)
    model = CLIPModel(config)
    try:
        result = model.load_state_dict(converted, strict=False)
    except RuntimeError as e:  # shapes that disagree with open_clip_config.json
        raise ModelLoadError(f"{folder}: weights do not fit {CONFIG_FILE}: "
                             f"{' '.join(str(e).split())[:300]}") from None
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{folder}: converted weights do not fit CLIPModel: missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")
    return OpenClipCheckpoint(model.eval(), mean, std, config.text_config.max_position_embeddings, tokenizer)


def open_clip_tokenizer(spec: str) -> Any:
    """The tokenizer of ``open_clip:FOLDER[?tokenizer=T]`` alone (a student's, without converting the weights)."""
    folder, tok_option = parse_spec(spec)
    cfg = read_config(folder)
    check_mappable(cfg, folder / CONFIG_FILE)
    return find_tokenizer(folder, tok_option, cfg, int(cfg["model_cfg"]["text_cfg"].get("vocab_size", 49408)))
