"""Where each layer of a file goes in another layout of its model family: renamed (SDXL's SGM and
diffusers names), cut by rows (FLUX: sd-scripts' fused qkv / linear1 into diffusers' separate
projections) or put together (the reverse). The name tables are the family descriptors'
(networks.tlora_families); this module only plans and applies them, exactly, to standard LoRA
factors and to the reference changes they are checked against."""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from networks.tlora_families import (
    FLUX,
    FLUX_BFL,
    FLUX_DIFFUSERS,
    SD_UNET,
    SDXL,
    SDXL_SGM,
    Family,
    flux_bfl_path,
    flux_bfl_to_diffusers,
    flux_diffusers_to_bfl,
    is_sgm_name,
    kohya_name,
    module_path,
    unet_name_from_sgm,
    unet_name_to_sgm,
)

from .core import ConversionError, Converted


@dataclasses.dataclass(frozen=True)
class Piece:
    source: str  # layer name in the file
    rows: Optional[Tuple[int, int]]  # (start, count) of the source's output rows taken; None: all
    offset: int  # first output row of the piece in the output module


@dataclasses.dataclass
class OutputModule:
    name: str  # kohya name in the output layout
    pieces: List[Piece]
    out_rows: int


def plan(sources: Dict[str, Tuple[int, ...]], family: Family, layout_name: str, layers_per_block: int = 2) -> List[OutputModule]:
    """One OutputModule per layer of the output layout. `sources`: {layer name: weight shape}."""
    outputs: Dict[str, OutputModule] = {}
    merges: Dict[str, Dict[int, Tuple[str, int]]] = {}  # FLUX fused name -> {part index: (source, rows)}
    for name, shape in sources.items():
        rows = int(shape[0])
        if family is SDXL and name.startswith("lora_unet_"):
            try:
                renamed = unet_name_to_sgm(unet_name_from_sgm(name, layers_per_block), layers_per_block) if layout_name == SDXL_SGM.name \
                    else unet_name_from_sgm(name, layers_per_block) if is_sgm_name(name) else name
            except ValueError as e:
                raise ConversionError(f"{name}: {e}") from None
            outputs[renamed] = OutputModule(renamed, [Piece(name, None, 0)], rows)
        elif family is FLUX and name.startswith(FLUX_BFL.prefix + "_") and layout_name == FLUX_DIFFUSERS.name:
            path = flux_bfl_path(name[len(FLUX_BFL.prefix) + 1:])
            try:
                parts = flux_bfl_to_diffusers(path, rows)
            except ValueError as e:
                raise ConversionError(f"{name}: {e}") from None
            for part in parts:
                out = kohya_name(FLUX_DIFFUSERS.prefix, part.path)
                outputs[out] = OutputModule(out, [Piece(name, (part.start, part.rows), 0)], part.rows)
        elif family is FLUX and name.startswith(FLUX_DIFFUSERS.prefix + "_") and layout_name == FLUX_BFL.name:
            path = module_path(name[len(FLUX_DIFFUSERS.prefix) + 1:])
            try:
                fused, index, count = flux_diffusers_to_bfl(path)
            except ValueError as e:
                raise ConversionError(f"{name}: {e}") from None
            out = kohya_name(FLUX_BFL.prefix, fused)
            if count == 1:
                outputs[out] = OutputModule(out, [Piece(name, None, 0)], rows)
            else:
                merges.setdefault(out, {})[index] = (name, rows)
        else:
            outputs[name] = OutputModule(name, [Piece(name, None, 0)], rows)
    for out, parts in merges.items():
        outputs[out] = _merged(out, parts)
    return list(outputs.values())


def _merged(out: str, parts: Dict[int, Tuple[str, int]]) -> OutputModule:
    """The fused FLUX layer of its parts: q, k, v (and the MLP input of linear1) stacked by rows;
    a missing part contributes zero rows of its size (q/k/v: the hidden size; the MLP: 4x the
    hidden size, FLUX's MLP ratio)."""
    is_linear1 = out.endswith("_linear1")
    hidden = next(rows for index, (_, rows) in parts.items() if index < 3) if any(i < 3 for i in parts) else None
    if hidden is None:
        raise ConversionError(f"{out}: only the MLP part of the fused layer is in the file; its q/k/v size is unknown")
    sizes = [hidden, hidden, hidden] + ([parts[3][1] if 3 in parts else 4 * hidden] if is_linear1 else [])
    pieces, offset = [], 0
    for index, size in enumerate(sizes):
        if index in parts:
            source, rows = parts[index]
            if rows != size:
                raise ConversionError(f"{source}: {rows} rows, but the other parts of {out} have {hidden}")
            pieces.append(Piece(source, None, offset))
        offset += size
    return OutputModule(out, pieces, offset)


def apply(module: OutputModule, converted: Dict[str, Converted]) -> Converted:
    """The standard factors of one output module from the sources' standard factors: exact
    (cutting rows of up, or stacking the pieces' factors block-diagonally)."""
    if len(module.pieces) == 1 and module.pieces[0].rows is None and module.pieces[0].offset == 0:
        source = converted[module.pieces[0].source]
        return dataclasses.replace(source, name=module.name)
    if len(module.pieces) == 1 and module.pieces[0].offset == 0:
        piece = module.pieces[0]
        source = converted[piece.source]
        start, count = piece.rows
        return dataclasses.replace(source, name=module.name, up=source.up[start:start + count].clone())
    downs, ups = [], []
    total_rank = sum(converted[p.source].rank for p in module.pieces)
    column = 0
    for piece in module.pieces:
        source = converted[piece.source]
        up = torch.zeros(module.out_rows, total_rank, *source.up.shape[2:], dtype=source.up.dtype)
        # each piece keeps its own alpha/rank scale: fold it in, the merged module has scale 1
        up[piece.offset:piece.offset + source.up.shape[0], column:column + source.rank] = source.up * (source.alpha / source.rank)
        ups.append(up[:, column:column + source.rank])
        downs.append(source.down)
        column += source.rank
    predicted = max(converted[p.source].predicted_error for p in module.pieces)
    return Converted(module.name, torch.cat(downs, 0), torch.cat(ups, 1), float(total_rank), predicted)


def reference(module: OutputModule, deltas: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The output module's change assembled from the sources' native changes, the same way."""
    first = deltas[module.pieces[0].source]
    out = torch.zeros(module.out_rows, *first.shape[1:], dtype=first.dtype)
    for piece in module.pieces:
        delta = deltas[piece.source]
        if piece.rows is not None:
            delta = delta[piece.rows[0]:piece.rows[0] + piece.rows[1]]
        out[piece.offset:piece.offset + delta.shape[0]] = delta
    return out


def layout_names(family: Family) -> Sequence[str]:
    return [layout.name for layout in family.layouts]


def diffusers_layout(family: Family) -> str:
    """The layout whose module names diffusers' pipelines use for the denoiser."""
    for layout in family.layouts:
        if layout in (SD_UNET, FLUX_DIFFUSERS):
            return layout.name
    raise ConversionError(f"{family.title} has no diffusers layout")
