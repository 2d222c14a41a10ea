"""open_clip checkpoints in (``open_clip:FOLDER``): the conversion to CLIPModel is exact, the rest is refused.

The proof builds a tiny random transformers CLIPModel, writes the state dict open_clip would hold for it (the
inverse mapping, from open_clip's model.py/transformer.py: fused ``in_proj_weight``, ``visual.proj`` and
``text_projection`` as [width, embed_dim], ...), saves it in open_clip's hub layout and loads it back. The
embeddings are checked against the CLIPModel and against a reference forward written from open_clip's own code
(nn.MultiheadAttention over the fused weights, ``x @ proj``, EOT pooling at the argmax token id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from mmkd.cli import main
from mmkd.models.hub import ModelLoadError, load_dual_encoder

WIDTH, LAYERS, HEADS, PATCH, IMAGE, EMBED, CONTEXT = 32, 2, 2, 8, 32, 24, 16
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
TEXTS = ["a red square", "two small blue circles next to a tree", "cat"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table (the base alphabet of CLIP's BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer_dir(root: Path) -> Path:
    """A small real CLIP BPE tokenizer (OpenAI's vocabulary order: bytes, bytes</w>, merges, then the two specials,
    so <|endoftext|> has the largest id as in open_clip) saved with save_pretrained."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [(a, b + "</w>") for a in letters for b in letters]
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "raw").mkdir(exist_ok=True)
    (root / "raw" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "raw" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(str(root / "raw" / "vocab.json"), str(root / "raw" / "merges.txt"))
    out = root / "tokenizer"
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clip_tokenizer_dir(tmp_path_factory.mktemp("cliptok"))


def tiny_clip(act: str, vocab: int, seed: int = 0) -> Any:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    common = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
                  hidden_act=act)
    cfg = CLIPConfig(vision_config=dict(common, image_size=IMAGE, patch_size=PATCH),
                     text_config=dict(common, vocab_size=vocab, max_position_embeddings=CONTEXT, eos_token_id=2,
                                      bos_token_id=None, pad_token_id=0), projection_dim=EMBED)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # random LayerNorms and biases too, so a swapped pair of tensors cannot go unseen
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if name.endswith("norm.weight")
                                                                         or "layer_norm" in name and
                                                                         name.endswith("weight") else 0.0))
        model.logit_scale.fill_(2.7)
    return model


def to_open_clip_state(clip: Any, text_prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict open_clip's CLIP (VisionTransformer + text Transformer) holds for ``clip``: the inverse map."""
    s = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def block(src: str, dst: str) -> None:
        out[f"{dst}.attn.in_proj_weight"] = torch.cat([s[f"{src}.self_attn.{n}_proj.weight"] for n in "qkv"])
        out[f"{dst}.attn.in_proj_bias"] = torch.cat([s[f"{src}.self_attn.{n}_proj.bias"] for n in "qkv"])
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for w in ("weight", "bias"):
                out[f"{dst}.{a}.{w}"] = s[f"{src}.{b}.{w}"]

    v, t, p = "vision_model", "text_model", text_prefix
    out["visual.conv1.weight"] = s[f"{v}.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = s[f"{v}.embeddings.class_embedding"]
    out["visual.positional_embedding"] = s[f"{v}.embeddings.position_embedding.weight"]
    for w in ("weight", "bias"):
        out[f"visual.ln_pre.{w}"] = s[f"{v}.pre_layrnorm.{w}"]
        out[f"visual.ln_post.{w}"] = s[f"{v}.post_layernorm.{w}"]
        out[f"{p}ln_final.{w}"] = s[f"{t}.final_layer_norm.{w}"]
    for i in range(LAYERS):
        block(f"{v}.encoder.layers.{i}", f"visual.transformer.resblocks.{i}")
        block(f"{t}.encoder.layers.{i}", f"{p}transformer.resblocks.{i}")
    out["visual.proj"] = s["visual_projection.weight"].t().contiguous()
    out[f"{p}token_embedding.weight"] = s[f"{t}.embeddings.token_embedding.weight"]
    out[f"{p}positional_embedding"] = s[f"{t}.embeddings.position_embedding.weight"]
    out[f"{p}text_projection"] = s["text_projection.weight"].t().contiguous()
    out["logit_scale"] = s["logit_scale"]
    return {k: v.contiguous() for k, v in out.items()}


def open_clip_config(quick_gelu: bool, vocab: int, **model_extra: Any) -> dict[str, Any]:
    vision = {"image_size": IMAGE, "layers": LAYERS, "width": WIDTH, "patch_size": PATCH,
              "head_width": WIDTH // HEADS, "mlp_ratio": 4.0}
    text = {"context_length": CONTEXT, "vocab_size": vocab, "width": WIDTH, "heads": HEADS, "layers": LAYERS}
    model_cfg: dict[str, Any] = {"embed_dim": EMBED, "vision_cfg": vision, "text_cfg": text, **model_extra}
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    return {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD),
                                                       "interpolation": "bicubic", "resize_mode": "shortest"}}


def write_open_clip(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor],
                    tokenizer: Path | None = None, weights: str = "open_clip_model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    if weights.endswith(".safetensors"):
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


# --- a reference forward written from open_clip's model.py / transformer.py (not from transformers)

def _ln(x: torch.Tensor, s: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), s[f"{name}.weight"], s[f"{name}.bias"], 1e-5)


def _resblocks(x: torch.Tensor, s: dict[str, torch.Tensor], prefix: str, quick: bool,
               mask: torch.Tensor | None) -> torch.Tensor:
    for i in range(LAYERS):
        p = f"{prefix}transformer.resblocks.{i}"
        attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        attn.load_state_dict({k[len(p) + 6:]: v for k, v in s.items() if k.startswith(f"{p}.attn.")})
        h = _ln(x, s, f"{p}.ln_1")
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.linear(_ln(x, s, f"{p}.ln_2"), s[f"{p}.mlp.c_fc.weight"], s[f"{p}.mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h) if quick else F.gelu(h)
        x = x + F.linear(h, s[f"{p}.mlp.c_proj.weight"], s[f"{p}.mlp.c_proj.bias"])
    return x


def reference_image(s: dict[str, torch.Tensor], pixels: torch.Tensor, quick: bool) -> torch.Tensor:
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = s["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = _ln(torch.cat([cls, x], dim=1) + s["visual.positional_embedding"], s, "visual.ln_pre")
    x = _resblocks(x, s, "visual.", quick, None)
    return _ln(x[:, 0], s, "visual.ln_post") @ s["visual.proj"]


def reference_text(s: dict[str, torch.Tensor], ids: torch.Tensor, quick: bool, p: str = "") -> torch.Tensor:
    n = ids.shape[1]
    x = s[f"{p}token_embedding.weight"][ids] + s[f"{p}positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu_(1)  # open_clip's build_causal_mask
    x = _ln(_resblocks(x, s, p, quick, mask), s, f"{p}ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ s[f"{p}text_projection"]


@pytest.mark.parametrize("act,variant", [("quick_gelu", "plain"), ("gelu", "plain"), ("gelu", "custom_text_bin"),
                                         ("quick_gelu", "final_ln_after_pool")])
def test_open_clip_converts_exactly(tmp_path: Path, tokenizer_dir: Path, act: str, variant: str) -> None:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    clip = tiny_clip(act, vocab)
    quick = act == "quick_gelu"
    prefix = "text." if variant == "custom_text_bin" else ""
    cfg = open_clip_config(quick, vocab, **({"custom_text": True} if prefix else {}))
    if variant == "final_ln_after_pool":  # a per-token LayerNorm commutes with CLS/EOT pooling: the same model
        cfg["model_cfg"]["vision_cfg"]["final_ln_after_pool"] = True
        cfg["model_cfg"]["text_cfg"]["final_ln_after_pool"] = True
    state = to_open_clip_state(clip, prefix)
    weights = "open_clip_pytorch_model.bin" if variant == "custom_text_bin" else "open_clip_model.safetensors"
    folder = write_open_clip(tmp_path / "oc", cfg, state, tokenizer_dir, weights)

    model = load_dual_encoder(f"open_clip:{folder}")
    assert model.meta.image_mean == MEAN and model.meta.image_std == STD and model.meta.image_size == IMAGE
    assert model.meta.max_text_length == CONTEXT
    assert torch.allclose(model.logit_scale, torch.tensor(2.7))
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    tok = model.tokenize(TEXTS)
    assert int(tok["input_ids"].max()) == vocab - 1  # <|endoftext|>, the largest id, ends every text
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(tok["input_ids"], tok["attention_mask"])
        ref_img = reference_image(state, pixels, quick)
        ref_txt = torch.cat([reference_text(state, tok["input_ids"][i:i + 1, :int(tok["attention_mask"][i].sum())],
                                            quick, prefix) for i in range(len(TEXTS))])
        hf = clip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    assert torch.allclose(img, ref_img, atol=1e-5), (img - ref_img).abs().max()
    assert torch.allclose(txt, ref_txt, atol=1e-5), (txt - ref_txt).abs().max()
    assert torch.allclose(F.normalize(img, dim=-1), hf.image_embeds, atol=1e-5)
    assert torch.allclose(F.normalize(txt, dim=-1), hf.text_embeds, atol=1e-5)
    if quick:  # the activation matters: the other one gives other embeddings
        assert not torch.allclose(img, reference_image(state, pixels, False), atol=1e-3)


@pytest.mark.parametrize("section,key,value", [
    ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
    ("text_cfg", "hf_model_name", "roberta-base"),
    ("vision_cfg", "attentional_pool", True),
    ("vision_cfg", "no_ln_pre", True),
    ("vision_cfg", "pool_type", "avg"),
    ("vision_cfg", "layers", [3, 4, 6, 3]),
    ("vision_cfg", "ls_init_value", 1e-5),
    ("text_cfg", "pool_type", "last"),
    ("text_cfg", "proj_bias", True),
    ("text_cfg", "no_causal_mask", True),
    ("text_cfg", "norm_kwargs", {"eps": 1e-6}),
    ("model", "init_logit_bias", -10),
    ("model", "multimodal_cfg", {"width": 32}),
    ("vision_cfg", "mlp_type", "swiglu"),  # a key we do not know, set: refused rather than ignored
])
def test_unmappable_configs_are_refused_naming_the_key(tmp_path: Path, section: str, key: str, value: Any) -> None:
    cfg = open_clip_config(False, 1190)
    (cfg["model_cfg"] if section == "model" else cfg["model_cfg"][section])[key] = value
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_dual_encoder(f"open_clip:{folder}")
    msg = str(e.value)
    assert "\n" not in msg and key in msg and "open_clip_config.json" in msg, msg


def test_weights_that_do_not_map_are_refused(tmp_path: Path, tokenizer_dir: Path) -> None:
    clip = tiny_clip("gelu", 1190)
    state = to_open_clip_state(clip)
    cfg = open_clip_config(False, 1190)
    extra = dict(state, **{"visual.attn_pool.query": torch.zeros(4, WIDTH)})
    with pytest.raises(ModelLoadError, match=r"visual\.attn_pool\.query"):
        load_dual_encoder(f"open_clip:{write_open_clip(tmp_path / 'a', cfg, extra, tokenizer_dir)}")
    lacking = {k: v for k, v in state.items() if k != "visual.ln_pre.weight"}
    with pytest.raises(ModelLoadError, match=r"lack visual\.ln_pre\.weight"):
        load_dual_encoder(f"open_clip:{write_open_clip(tmp_path / 'b', cfg, lacking, tokenizer_dir)}")
    bias = dict(state, logit_bias=torch.tensor(-10.0))
    with pytest.raises(ModelLoadError, match="logit_bias"):
        load_dual_encoder(f"open_clip:{write_open_clip(tmp_path / 'c', cfg, bias, tokenizer_dir)}")
    wrong = open_clip_config(False, 1190)
    wrong["model_cfg"]["vision_cfg"]["width"] = 64
    with pytest.raises(ModelLoadError, match="do not fit open_clip_config.json"):
        load_dual_encoder(f"open_clip:{write_open_clip(tmp_path / 'd', wrong, state, tokenizer_dir)}")
    nothing = tmp_path / "e"
    nothing.mkdir()
    (nothing / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_dual_encoder(f"open_clip:{nothing}")
    pickled = write_open_clip(tmp_path / "f", cfg, state, tokenizer_dir, "open_clip_pytorch_model.bin")
    torch.save({"state": state, "code": print}, pickled / "open_clip_pytorch_model.bin")  # needs unpickling code
    with pytest.raises(ModelLoadError, match="holds pickled objects, not only tensors; refused"):
        load_dual_encoder(f"open_clip:{pickled}")


def test_tokenizer_from_the_option_or_refused(tmp_path: Path, tokenizer_dir: Path, minilm_path: str) -> None:
    clip = tiny_clip("gelu", 1190)
    folder = write_open_clip(tmp_path / "oc", open_clip_config(False, 1190), to_open_clip_state(clip))
    with pytest.raises(ModelLoadError, match=r"has no tokenizer files.*\?tokenizer="):
        load_dual_encoder(f"open_clip:{folder}")
    model = load_dual_encoder(f"open_clip:{folder}?tokenizer={tokenizer_dir}")
    assert len(model.tokenizer) == 1190
    with pytest.raises(ModelLoadError, match="vocab_size is 1190"):  # BERT's 30522 tokens: not this model's
        load_dual_encoder(f"open_clip:{folder}?tokenizer={minilm_path}")
    empty = tmp_path / "empty_tok"  # what an offline hub hands back: a tokenizer without its vocabulary
    empty.mkdir()
    from transformers import CLIPTokenizer
    (empty / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (empty / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(empty / "vocab.json"), str(empty / "merges.txt")).save_pretrained(str(empty))
    with pytest.raises(ModelLoadError, match="only 2 tokens"):
        load_dual_encoder(f"open_clip:{folder}?tokenizer={empty}")


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    clip = tiny_clip("quick_gelu", 1190)
    return write_open_clip(tmp_path_factory.mktemp("oc") / "ViT-tiny", open_clip_config(True, 1190),
                           to_open_clip_state(clip), tokenizer_dir)


def test_eval_cli_runs_on_an_open_clip_folder(open_clip_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--model", f"open_clip:{open_clip_dir}", "--data", "world:test",
                 "--limit", "32", "--cache", str(tmp_path / "cache"), "--world-n", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "top1" in json.dumps(out)
    bad = tmp_path / "timm"
    bad.mkdir()
    cfg = open_clip_config(False, 1190)
    cfg["model_cfg"]["vision_cfg"]["timm_model_name"] = "convnext_base"
    (bad / "open_clip_config.json").write_text(json.dumps(cfg))
    assert main(["eval", "zeroshot", "--model", f"open_clip:{bad}", "--data", "world:test", "--limit", "8",
                 "--cache", str(tmp_path / "cache"), "--world-n", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "timm_model_name" in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_open_clip_as_student_tower_source(open_clip_dir: Path) -> None:
    from mmkd.config import StudentConfig, TowerSpec
    from mmkd.models.student import build_student

    spec = f"open_clip:{open_clip_dir}"
    teacher = load_dual_encoder(spec)
    cfg = StudentConfig(vision=TowerSpec(source=spec, keep_layers=[1]), text=TowerSpec(source=spec),
                        projection_dim=EMBED)
    student = build_student(teacher, cfg, seed=0)
    assert len(student.tokenizer) == 1190
    assert student.vision_model.config.num_hidden_layers == 1  # shrunk: layer 1 of 2 kept
    tok = student.tokenize(TEXTS)
    with torch.no_grad():  # the text tower is the teacher's, unchanged
        assert torch.allclose(student.text_features(**tok), teacher.text_features(**tok), atol=1e-6)
    with pytest.raises(ModelLoadError, match="converted on load"):  # where only a plain folder will do
        from mmkd.teacher.unimodal import load_image_teacher
        load_image_teacher(spec)


@pytest.mark.slow
def test_distill_from_an_open_clip_teacher(open_clip_dir: Path, tmp_path: Path) -> None:
    from conftest import write_run_config

    assert main(["distill", str(write_run_config(tmp_path, f"open_clip:{open_clip_dir}"))]) == 0
    student = load_dual_encoder(tmp_path / "run" / "student")
    assert student.meta.image_mean == MEAN and student.meta.max_text_length == CONTEXT  # the teacher's settings
    assert student.vision_model.config.num_hidden_layers == 1 and len(student.tokenizer) == 1190
