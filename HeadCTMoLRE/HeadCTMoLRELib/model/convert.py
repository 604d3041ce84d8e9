"""`headct-molre convert-weights`: released checkpoints of native families -> a safetensors backbone folder.

Families: medimageinsight (below) and pillar0 (Pillar0-HeadCT's model.safetensors or a pickled
checkpoint: the Atlas vision tower ``model.visual.*`` is kept, renamed to model/atlas.py's names, the
text side dropped; the stage depths are read from the weights, the number of heads and the window
geometry from a released config.json beside the weights when there is one).

The released MedImageInsight weights are a pickled ``.pt`` (or, in some redistributions, a
``.safetensors``) holding the whole UniCL model: ``image_encoder.*`` (the DaViT), ``image_projection``
(C_last x projection_dim), the text tower (``lang_encoder.*``, ``lang_projection``) and ``logit_scale``.
Conversion keeps the image encoder and the projection, renames them to model/davit.py's names and writes

    OUT/config.json          the DaViTConfig (model_type "medimageinsight_davit"), shapes read from the weights
    OUT/model.safetensors    the image encoder + projection (float32)
    OUT/conversion.json      provenance: source file, its sha256, what was dropped

A pickled file is read ONLY with ``torch.load(weights_only=True)`` (tensors and plain containers; no
code can run); a file that needs full unpickling is refused. Bundles and inference read only the
safetensors folder this writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

PICKLED_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, the problem and what to do."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a pickle read with torch.load(weights_only=True).

    A dict nested under "state_dict" / "model" / "module" is unwrapped; non-tensor entries are ignored.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise ConversionError(f"{path} is not a readable safetensors file ({error})") from error
    if path.suffix not in PICKLED_SUFFIXES:
        raise ConversionError(
            f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or a PyTorch "
            f"checkpoint ({', '.join(PICKLED_SUFFIXES)})"
        )
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError (needs code), or a damaged file
        raise ConversionError(
            f"{path} cannot be read safely: torch.load(weights_only=True) refused it ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}). HeadCTMoLRE never unpickles "
            "arbitrary objects; re-save the checkpoint as a plain state dict (or safetensors) on a machine "
            "you trust."
        ) from error
    for key in ("state_dict", "model", "module"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a {type(data).__name__}, not a state dict of named tensors")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(f"{path} holds no tensors")
    return tensors


# -------------------------------------------------------------------------------------------------
# MedImageInsight (UniCL: DaViT image encoder + projection)

# Older MedImageInsight/Florence checkpoints name the same modules differently (module aliases).
_MEDIMAGEINSIGHT_ALIASES = (
    ("conv_embeds.", "convs."),
    ("main_blocks.", "blocks."),
    (".0.cpe.0.proj.", ".spatial_block.conv1.fn.dw."),
    (".0.cpe.1.proj.", ".spatial_block.conv2.fn.dw."),
    (".0.attn.", ".spatial_block.window_attn.fn."),
    (".0.mlp.", ".spatial_block.ffn.fn.net."),
    (".0.norm1.", ".spatial_block.window_attn.norm."),
    (".0.norm2.", ".spatial_block.ffn.norm."),
    (".1.cpe.0.proj.", ".channel_block.conv1.fn.dw."),
    (".1.cpe.1.proj.", ".channel_block.conv2.fn.dw."),
    (".1.attn.", ".channel_block.channel_attn.fn."),
    (".1.mlp.", ".channel_block.ffn.fn.net."),
    (".1.norm1.", ".channel_block.channel_attn.norm."),
    (".1.norm2.", ".channel_block.ffn.norm."),
)
_BLOCK = r"blocks\.(?P<stage>\d+)\.(?P<block>\d+)\.(?P<kind>spatial|channel)_block\."
_MEDIMAGEINSIGHT_RULES = (
    (re.compile(r"convs\.(?P<stage>\d+)\.(?P<part>proj|norm)\.(?P<leaf>weight|bias)"),
     "stages.{stage}.embed.{part}.{leaf}"),
    (re.compile(_BLOCK + r"conv(?P<n>[12])\.fn\.dw\.(?P<leaf>weight|bias)"),
     "stages.{stage}.blocks.{block}.{kind}.pos{n}.conv.{leaf}"),
    (re.compile(_BLOCK + r"(?:window_attn|channel_attn)\.norm\.(?P<leaf>weight|bias)"),
     "stages.{stage}.blocks.{block}.{kind}.norm1.{leaf}"),
    (re.compile(_BLOCK + r"(?:window_attn|channel_attn)\.fn\.(?P<part>qkv|proj)\.(?P<leaf>weight|bias)"),
     "stages.{stage}.blocks.{block}.{kind}.attn.{part}.{leaf}"),
    (re.compile(_BLOCK + r"ffn\.norm\.(?P<leaf>weight|bias)"),
     "stages.{stage}.blocks.{block}.{kind}.norm2.{leaf}"),
    (re.compile(_BLOCK + r"ffn\.fn\.net\.(?P<part>fc1|fc2)\.(?P<leaf>weight|bias)"),
     "stages.{stage}.blocks.{block}.{kind}.mlp.{part}.{leaf}"),
    (re.compile(r"norms\.(?P<leaf>weight|bias)"), "norm.{leaf}"),
)
_DROPPED_PREFIXES = ("lang_encoder.", "text.", "lang_projection", "text_projection", "logit_scale", "head.")


def medimageinsight_state(checkpoint: dict[str, torch.Tensor], size: str = "base"):
    """(DaViTConfig, state dict under model/davit.py's names, dropped key names) from a UniCL checkpoint.

    Shapes (stage widths, depths, projection size) are read from the weights and must equal the named
    size of the family (heads, groups and window size are not visible in the weights and come from it).
    """
    from .backbones import FAMILIES
    from .davit import DaViTConfig, DaViTImageEncoder

    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    projection = None
    for original, tensor in checkpoint.items():
        key = original[len("module."):] if original.startswith("module.") else original
        if key in ("image_projection", "vision_projection"):
            projection = tensor
            continue
        if key.startswith(("image_encoder.", "visual.")):
            key = key.split(".", 1)[1]
        elif key.startswith(_DROPPED_PREFIXES):
            dropped.append(original)
            continue
        if key.startswith("head."):  # the DaViT's classification head (unused by MedImageInsight)
            dropped.append(original)
            continue
        for old, new in _MEDIMAGEINSIGHT_ALIASES:
            key = key.replace(old, new)
        for pattern, template in _MEDIMAGEINSIGHT_RULES:
            match = pattern.fullmatch(key)
            if match:
                state[template.format(**match.groupdict())] = tensor.float().contiguous()
                break
        else:
            unknown.append(original)
    if unknown:
        raise ConversionError(
            f"the checkpoint has {len(unknown)} tensors that are not part of MedImageInsight's image encoder, "
            f"e.g. {unknown[:5]}; is it a MedImageInsight (UniCL) checkpoint?"
        )
    if projection is None:
        raise ConversionError("the checkpoint has no image_projection: it is not a MedImageInsight (UniCL) model")
    if not state:
        raise ConversionError("the checkpoint has no image_encoder.* tensors: it is not a MedImageInsight model")
    state["projection.weight"] = projection.float().t().contiguous()

    stages = sorted({int(k.split(".")[1]) for k in state if k.startswith("stages.")})
    widths = [int(state[f"stages.{i}.embed.proj.weight"].shape[0]) for i in stages]
    depths = [len({k.split(".")[3] for k in state if k.startswith(f"stages.{i}.blocks.")}) for i in stages]
    found = {"embed_dims": widths, "depths": depths, "projection_dim": int(projection.shape[1])}
    expected = FAMILIES["medimageinsight"].sizes[size]
    differ = {k: (v, list(expected[k]) if isinstance(expected[k], (list, tuple)) else expected[k])
              for k, v in found.items() if v != (list(expected[k]) if isinstance(expected[k], (list, tuple)) else expected[k])}
    if differ:
        raise ConversionError(
            f"the checkpoint's image encoder has another shape than MedImageInsight size {size!r} "
            f"(found vs expected: {differ}); pass the matching --size"
        )
    config = DaViTConfig(**{k: v for k, v in expected.items()})
    with torch.device("meta"):  # names and shapes only, nothing allocated
        reference = DaViTImageEncoder(config)
    wanted = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    missing = sorted(set(wanted) - set(state))
    wrong = sorted(k for k in set(wanted) & set(state) if tuple(state[k].shape) != wanted[k])
    if missing or wrong:
        raise ConversionError(
            f"the checkpoint's image encoder is incomplete or differently shaped: missing {missing[:5]}, "
            f"wrong shape {[(k, tuple(state[k].shape), wanted[k]) for k in wrong[:3]]}"
        )
    return config, state, sorted(dropped)


# -------------------------------------------------------------------------------------------------
# Pillar-0 (CLIP: Atlas vision tower under model.visual.*, a text side that is not used)

_VISUAL_PREFIXES = ("module.model.visual.", "model.visual.", "visual.")
_EMBED = r"patch_embeds\.(?P<modality>[a-z_]+)\."
_BLOCK3D = r"atlas_models\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\."
_LEAF = r"(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)"
_STEM_PARTS = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
_SCALE_PARTS = {"norm1_q": "norm_q", "norm1_kv": "norm_kv", "attn.q": "attn.q", "attn.kv": "attn.kv",
                "attn.proj": "attn.proj", "norm2": "norm_mlp", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_PILLAR0_RULES = (
    (re.compile(_EMBED + r"conv_down\.(?P<part>[0-9])\." + _LEAF),
     lambda g: f"stem.{_STEM_PARTS[g['part']]}.{g['leaf']}" if g["part"] in _STEM_PARTS else None),
    (re.compile(_EMBED + r"conv1\.(?P<k>\d+)\.(?P<part>conv1|norm1|conv2|norm2)\." + _LEAF),
     lambda g: f"stem.blocks.{g['k']}.{g['part']}.{g['leaf']}"),
    (re.compile(_EMBED + r"ds1\.norm\.(?P<leaf>weight|bias)"), lambda g: f"stem.down_norm.{g['leaf']}"),
    (re.compile(_EMBED + r"ds1\.reduction\.0\.weight"), lambda g: "stem.down.weight"),
    (re.compile(_BLOCK3D + r"blocks\.(?P<scale>\d+)\.(?P<part>norm1_q|norm1_kv|attn\.q|attn\.kv|attn\.proj|norm2|"
                r"mlp\.fc1|mlp\.fc2)\.(?P<leaf>weight|bias)"),
     lambda g: f"stages.{g['stage']}.blocks.{g['block']}.scales.{g['scale']}.{_SCALE_PARTS[g['part']]}.{g['leaf']}"),
    (re.compile(_BLOCK3D + r"posemb\.(?P<scale>\d+)\.cpb_mlp\.(?P<part>0|2)\.(?P<leaf>weight|bias)"),
     lambda g: f"stages.{g['stage']}.blocks.{g['block']}.positions.{g['scale']}.{'fc1' if g['part'] == '0' else 'fc2'}"
               f".{g['leaf']}"),
)


def _released_atlas_settings(source: Path | None) -> dict[str, Any]:
    """num_heads, merge_ratio, local2global and the volume (image_size, num_frames) from a released
    config.json beside the weights, if any.

    Read as JSON only; the keys are searched for (Pillar-0 nests them under vision_cfg.model_config:
    ``model.atlas_args.num_heads`` and ``modalities.<modality>.merge_ratio`` / ``local2global`` /
    ``image_size`` = [H, W, D])."""
    if source is None or not (source.parent / "config.json").is_file():
        return {}
    config_path = source.parent / "config.json"
    if config_path.stat().st_size > 1024 * 1024:
        return {}
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    found: dict[str, Any] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            args = node.get("atlas_args")
            if isinstance(args, dict) and isinstance(args.get("num_heads"), int):
                found.setdefault("num_heads", args["num_heads"])
            for key in ("merge_ratio", "local2global"):
                value = node.get(key)
                if isinstance(value, list) and value and all(isinstance(v, int) for v in value) and len(set(value)) == 1:
                    found.setdefault(key, value[0])
            size = node.get("image_size")  # the reference's volume order: [H, W, D]
            if "merge_ratio" in node and isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) for v in size):
                found.setdefault("image_size", size[0])
                found.setdefault("num_frames", size[2])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(data)
    return found


def pillar0_state(checkpoint: dict[str, torch.Tensor], size: str = "headct", source: Path | None = None):
    """(AtlasConfig, state dict under model/atlas.py's names, dropped key names) from a Pillar-0 checkpoint.

    Widths (input windows, stem, token width) and the per-stage depths are read from the weights; the widths
    must equal the named size; the heads and the window geometry come from a released config.json beside
    the weights when there is one, else from the size (they are not visible in the weights)."""
    from .atlas import AtlasConfig, AtlasEncoder
    from .backbones import FAMILIES

    prefixed = any(k.startswith(_VISUAL_PREFIXES) for k in checkpoint)
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    modalities = set()
    for original, tensor in checkpoint.items():
        key = next((original[len(p):] for p in _VISUAL_PREFIXES if original.startswith(p)), None)
        if key is None:
            if prefixed:  # the text side, logit scale, ...: not part of the vision tower
                dropped.append(original)
                continue
            key = original
        for pattern, rename in _PILLAR0_RULES:
            match = pattern.fullmatch(key)
            if match:
                groups = match.groupdict()
                name = rename(groups)
                if name is not None:
                    modalities.add(groups.get("modality"))
                    state[name] = tensor if tensor.dtype == torch.int64 else tensor.float().contiguous()
                    break
        else:
            unknown.append(original)
    modalities.discard(None)
    if unknown:
        raise ConversionError(
            f"the checkpoint has {len(unknown)} tensors that are not part of Pillar-0's Atlas vision tower, "
            f"e.g. {unknown[:5]}; is it a Pillar-0 checkpoint?"
        )
    if len(modalities) > 1:
        raise ConversionError(f"the checkpoint holds patch embeddings of several modalities {sorted(modalities)}; "
                              "convert a single-modality Pillar-0 model (e.g. Pillar0-HeadCT)")
    if "stem.conv1.weight" not in state:
        raise ConversionError("the checkpoint has no Atlas patch embedding: it is not a Pillar-0 vision tower")
    stages = sorted({int(k.split(".")[1]) for k in state if k.startswith("stages.")})
    found = {
        "in_chans": int(state["stem.conv1.weight"].shape[1]),
        "num_features": int(state["stem.conv2.weight"].shape[0]),
        "dim": int(state["stem.down.weight"].shape[0]),
    }
    expected = FAMILIES["pillar0"].sizes[size]
    differ = {k: (v, expected[k]) for k, v in found.items() if v != expected[k]}
    if differ:
        raise ConversionError(
            f"the checkpoint's vision tower has another shape than Pillar0 size {size!r} (found vs expected: "
            f"{differ}); pass the matching --size"
        )
    values = dict(expected)
    values["stem_dim"] = int(state["stem.conv1.weight"].shape[0])
    values["depths"] = [len({k.split(".")[3] for k in state if k.startswith(f"stages.{i}.blocks.")}) for i in stages]
    fc1 = state.get("stages.0.blocks.0.scales.0.mlp.fc1.weight")
    if fc1 is not None:
        values["mlp_ratio"] = fc1.shape[0] / found["dim"]
    values.update(_released_atlas_settings(source))
    try:
        config = AtlasConfig(**values)
    except ValueError as error:
        raise ConversionError(f"the checkpoint does not describe a valid Atlas encoder: {error}") from error
    with torch.device("meta"):  # names and shapes only, nothing allocated
        reference = AtlasEncoder(config)
    wanted = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    missing = sorted(set(wanted) - set(state))
    extra = sorted(set(state) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(state) if tuple(state[k].shape) != wanted[k])
    if missing or extra or wrong:
        raise ConversionError(
            f"the checkpoint's vision tower does not fit an Atlas encoder of {config.num_scales} scales and depths "
            f"{config.depths}: missing {missing[:5]}, unexpected {extra[:5]}, wrong shape "
            f"{[(k, tuple(state[k].shape), wanted[k]) for k in wrong[:3]]}"
        )
    return config, state, sorted(dropped)


CONVERTERS: dict[str, Callable[..., Any]] = {"medimageinsight": medimageinsight_state, "pillar0": pillar0_state}


def convert_weights(family: str, source: str | Path, out_dir: str | Path, *, size: str | None = None) -> Path:
    """Convert a released checkpoint of `family` into OUT (config.json + model.safetensors + conversion.json)."""
    from safetensors.torch import save_file

    from .backbones import FAMILIES
    from .bundle import sha256_file

    if family not in CONVERTERS:
        raise ConversionError(
            f"convert-weights knows the families {sorted(CONVERTERS)}, not {family!r} (transformers families "
            "are used as Hugging Face folders directly)"
        )
    size = size or next((s for s in ("base", "headct") if s in FAMILIES[family].sizes), next(iter(FAMILIES[family].sizes)))
    if size not in FAMILIES[family].sizes:
        raise ConversionError(f"{family} has no size {size!r}; choose one of {list(FAMILIES[family].sizes)}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConversionError(f"{out_dir} already exists; choose another --out or remove it first")
    source = Path(source).expanduser().resolve()
    checkpoint = read_checkpoint(source)
    extra = {"source": source} if family == "pillar0" else {}
    config, state, dropped = CONVERTERS[family](checkpoint, size, **extra)
    out_dir.mkdir(parents=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt", "model_type": config.model_type})
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    provenance = {
        "family": family,
        "size": size,
        "source": str(source),
        "source_sha256": sha256_file(source),
        "tensors_kept": len(state),
        "parameters_kept": int(sum(t.numel() for t in state.values())),
        "tensors_dropped": len(dropped),
        "dropped_examples": dropped[:10],
    }
    (out_dir / "conversion.json").write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    return out_dir
