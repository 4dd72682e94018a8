"""What a run writes besides its state: the metadata of network files (sd-scripts' ss_* and
modelspec.* keys), the resolved configuration, converted standard LoRA files, and the closing
summary of where everything went."""

import json
import logging
import os
from typing import Dict, List

from .fileio import atomic_write_text, writing
from networks.tlora_families import Family

from .options import OPTIONS, parse_key_values

logger = logging.getLogger("train_tlora")


def build_metadata(args, family: Family, resolution, step: int, samples) -> Dict[str, str]:
    if args.no_metadata:
        return {}
    metadata = {
        "ss_network_module": "networks.tlora",
        "ss_network_args": json.dumps(parse_key_values(args.network_args, "network_args")),
        "ss_output_name": args.output_name,
        "ss_sd_model_name": os.path.basename(str(args.pretrained_model_name_or_path).rstrip("/")),
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_steps": str(step),
        "ss_max_train_steps": str(args.max_train_steps),
        "ss_learning_rate": str(args.learning_rate),
        "ss_unet_lr": str(args.unet_lr),
        "ss_text_encoder_lr": str(args.text_encoder_lr),
        "ss_optimizer": f"{args.optimizer_type}({' '.join(args.optimizer_args or [])})",
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_batch_size_per_device": str(args.train_batch_size),
        "ss_mixed_precision": args.mixed_precision,
        "ss_seed": str(args.seed),
        "ss_num_train_images": str(sum(s.repeats for s in samples)),
        "ss_network_train_unet_only": str(bool(args.network_train_unet_only)),
        "ss_training_comment": str(args.training_comment),
        "ss_trainer": "train_tlora.py",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": args.metadata_title or args.output_name,
    }
    # the family's keys (ss_base_model_version, ss_v2, modelspec.architecture / implementation),
    # with the resolution trained at rather than the family's native one
    metadata.update(family.lora_metadata(args.v_parameterization))
    metadata["modelspec.resolution"] = f"{resolution[0]}x{resolution[1]}"
    for key in ("author", "description", "license", "tags"):
        value = getattr(args, f"metadata_{key}")
        if value:
            metadata[f"modelspec.{key}"] = value
    return metadata


def resolved_config(args) -> Dict[str, object]:
    """Flat TOML of every option given or differing from its default (itself a valid --config_file)."""
    given = set(getattr(args, "_sources", {}))
    out = {}
    for option in OPTIONS:
        if option.name in ("config_file", "resume"):
            continue
        value = getattr(args, option.name)
        if value is None or (value == option.default and option.name not in given):
            continue
        out[option.name] = value
    return out


def write_resolved_config(path: str, args) -> None:
    import toml

    atomic_write_text(path, "# resolved configuration of this run (sd-scripts flat keys)\n" + toml.dumps(resolved_config(args)))


def convert_outputs(native_path: str, args, family: Family, unet) -> List[str]:
    """Standard LoRA files through `converters`, with every rank active (the time-independent
    "full" mask: what any loader that knows no timesteps applies). Other masks and ranks:
    `python -m converters to-kohya --help`."""
    targets = [t for t, wanted in (("kohya", args.save_kohya), ("diffusers", args.save_diffusers)) if wanted]
    if not targets:
        return []
    try:
        from converters import convert_file
    except ImportError as e:
        logger.warning("converted outputs skipped: the converters package is not available (%s); "
                       "convert later with `python -m converters to-kohya %s`", e, native_path)
        return []
    layers_per_block = getattr(unet.config, "layers_per_block", 2)
    written = []
    for target in targets:
        out = native_path[: -len(".safetensors")] + f"-{target}.safetensors"
        with writing(out):
            report = convert_file(native_path, out, target=target, mask="full", base=family.name,
                                  layers_per_block=layers_per_block if isinstance(layers_per_block, int) else 2,
                                  instance_prompt=args.instance_prompt)
        logger.info("converted to %s: %s", target, report.text() if hasattr(report, "text") else report)
        written.append(out)
    return written


def summary(args, native: str, converted: List[str], config_path: str, sample_dir: str, samples_written: List[str],
            checkpoints: bool, random_model: bool, tensorboard: bool) -> str:
    lines = ["", "finished: outputs are", f"  network (networks.tlora, timestep-aware): {native}"]
    lines += [f"  converted: {path}" for path in converted]
    lines.append(f"  resolved config: {config_path}")
    if samples_written:
        lines.append(f"  sample grids: {sample_dir} (last: {os.path.basename(samples_written[-1])})")
    if checkpoints:
        lines.append(f"  checkpoints: {args.output_dir}/{args.output_name}-stepNNNNNNNN.safetensors (+ the newest -state folder)")
    if tensorboard:
        lines.append(f"  TensorBoard logs: {args.logging_dir}")
    if random_model:
        lines.append("  note: the base model has RANDOM weights (a demo of the pipeline); these files are not useful for images")
    return "\n".join(lines)

