"""Everything that can be checked before a model loads, in one pass: the output folder can be
written, the optimiser and its options, the network options, the base model's family, the data,
the prompts, and the resume state. Raises a TrainerError (exit 2) and writes nothing."""

import dataclasses
from typing import Dict, List, Optional, Tuple

from . import checkpoints, data, models, optimizers
from .errors import UsageError
from .fileio import check_writable_folder, require_file
from .options import parse_key_values, parse_resolution, where
from .sampling import PromptSpec, read_prompts


@dataclasses.dataclass
class RunPlan:
    resolution: Tuple[int, int]  # width, height
    model: models.ModelInfo
    samples: List[data.Sample]
    prompts: List[PromptSpec]
    network_kwargs: Dict[str, str]
    optimizer_options: Dict[str, object]
    resume: Optional[checkpoints.SavedState]


def check_run(args) -> RunPlan:
    if not args.output_dir:
        raise UsageError("give --output_dir (where the network file, checkpoints and samples go)")
    check_writable_folder(args.output_dir, "output_dir")
    if args.logging_dir:
        check_writable_folder(args.logging_dir, "logging_dir")
    resolution = parse_resolution(args.resolution, where(args, "resolution"))
    optimizer_options = optimizers.check_optimizer_args(args)
    network_kwargs = _check_network_args(args)
    if args.network_weights:
        require_file(args.network_weights, "network_weights")
    model = models.inspect_model(args.pretrained_model_name_or_path)
    wanted = _family_tags(args)
    if wanted and model.family != "unknown" and model.family not in wanted:
        titles = " / ".join(models.FAMILIES[w].title for w in wanted)
        raise UsageError(
            f"this configuration is for {titles} (metadata_tags={args.metadata_tags!r}) but "
            f"{args.pretrained_model_name_or_path} is an {models.FAMILIES[model.family].title} model: use the matching preset "
            f"(e.g. *-sd15.toml for SD 1.5, *-sdxl.toml for SDXL) or another base model"
        )
    samples = data.collect_samples(args.train_data_dir, args.caption_extension, args.instance_prompt)
    data.check_images(samples)
    prompts = read_prompts(args.sample_prompts) if args.sample_prompts else []
    if args.sample_every_n_steps and not prompts:
        raise UsageError("sample_every_n_steps needs --sample_prompts (a text file with one prompt a line)")
    resume = None
    if args.resume:
        folder = checkpoints.resolve_resume(args.resume, args.output_dir, args.output_name)
        resume = checkpoints.read_state_folder(folder)
    return RunPlan(resolution, model, samples, prompts, network_kwargs, optimizer_options, resume)


def _family_tags(args) -> List[str]:
    """Family names (sd1, sdxl, ...) among --metadata_tags: the base model must be one of them."""
    tags = [t.strip().lower() for t in (args.metadata_tags or "").split(",")]
    return [t for t in tags if t in models.TRAINABLE_FAMILIES]


def _check_network_args(args) -> Dict[str, str]:
    """Parsed by the network module itself, so its own message names a bad key."""
    from networks.tlora_format import TLoRAFormatError, parse_network_args

    kwargs = parse_key_values(args.network_args, where(args, "network_args"))
    try:
        parse_network_args(args.network_dim, args.network_alpha, kwargs)
    except TLoRAFormatError as e:
        raise UsageError(str(e)) from None
    return kwargs

