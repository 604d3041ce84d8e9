"""`headct-molre convert-weights`: released checkpoints of native families -> a safetensors backbone folder.

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


CONVERTERS: dict[str, Callable[..., Any]] = {"medimageinsight": medimageinsight_state}


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
    size = size or ("base" if "base" in FAMILIES[family].sizes else next(iter(FAMILIES[family].sizes)))
    if size not in FAMILIES[family].sizes:
        raise ConversionError(f"{family} has no size {size!r}; choose one of {list(FAMILIES[family].sizes)}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ConversionError(f"{out_dir} already exists; choose another --out or remove it first")
    source = Path(source).expanduser().resolve()
    checkpoint = read_checkpoint(source)
    config, state, dropped = CONVERTERS[family](checkpoint, size)
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
