"""python -m converters <command> ...   (installed: tlora-convert <command> ...)"""

import argparse
import sys

from networks.tlora_families import FAMILIES

EPILOG = """examples:
  python -m converters info my_tlora.safetensors
  python -m converters to-kohya my_tlora.safetensors my_tlora_lora.safetensors --mask mean
  python -m converters to-kohya my_tlora.safetensors small.safetensors --mask t=500 --rank 16 --dtype fp16
  python -m converters to-kohya my_tlora.safetensors dyn.safetensors --keep-energy 0.99 --model-card --instance-prompt "a sks dog"
  python -m converters to-diffusers my_tlora.safetensors pytorch_lora_weights.safetensors --mask mean
  python -m converters import-official checkpoint-800/pytorch_lora_weights.safetensors native.safetensors --hparams logs/hparams.yml
  python -m converters import-official flux_run/checkpoint-1000/lora.pt native_flux.safetensors --hparams flux_run/logs/hparams.yml
  python -m converters import-lycoris lycoris_tlora.safetensors native.safetensors --base-model ./sdxl-base --min-rank 32

masks (T-LoRA's rank depends on the timestep; a standard LoRA file cannot, so one mask is baked in):
  full    every rank, as at t=0 (what a loader that ignores timesteps does with the native factors)
  mean    the average mask over t = 0..T-1 (lowest expected error of the weight change over timesteps)
  t=500   the mask of one timestep
alpha: outputs fold the source's alpha/rank scale into the factors and write alpha = rank (scale 1), so
  every loader applies the same change: kohya files zero-pad every U-Net module to one rank, and give
  all text-encoder modules one alpha (with any remaining per-module factor in the weights); diffusers
  files pad every module to one rank. (diffusers misreads per-module alphas of kohya files when ranks
  differ: 0.32 sets every scale to 1, 0.42 drops the alphas of attention projections; --keep-energy
  makes ranks differ.)
"""


class _Usage(Exception):
    """A command-line mistake argparse found; reported as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage(f"{self.prog}: {message} (see --help)")


def _convert_args(p):
    p.add_argument("input", help="native (or kohya) LoRA .safetensors")
    p.add_argument("output", help="output .safetensors (never the input)")
    p.add_argument("--mask", default="full", help="full | mean | t=<0..999>  (default full)")
    p.add_argument("--rank", type=int, default=None, help="compress every module to at most this rank by SVD")
    p.add_argument("--keep-energy", type=float, default=None, help="dynamic rank keeping this fraction of sum(s^2), e.g. 0.99")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="output dtype (default: the input's)")
    p.add_argument("--base", default=None, choices=list(FAMILIES), help="model family (default: detected; refused when the file contradicts it)")
    p.add_argument("--layers-per-block", type=int, default=2, help="U-Net layers per block for SDXL's SGM renaming (SDXL: 2)")
    p.add_argument("--model-card", action="store_true", help="write a README.md model card beside the output")
    p.add_argument("--instance-prompt", default=None, help="instance prompt for the model card")
    p.add_argument("--base-model", default=None, help="base model id for the model card")
    p.add_argument("--worst", type=int, default=5, help="how many worst modules to print")
    p.add_argument("--dry-run", action="store_true", help="convert and verify, write nothing")


def build_parser():
    parser = _Parser(
        prog="python -m converters",
        description="Convert T-LoRA / Ortho-LoRA / TriLoRA files (networks.tlora) to standard LoRA files for "
        "AUTOMATIC1111, Forge, ComfyUI and diffusers, and import official T-LoRA / LyCORIS files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=_Parser)
    p = sub.add_parser("info", help="describe a LoRA file", epilog="example: python -m converters info my_tlora.safetensors",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("--no-metadata", action="store_true", help="do not list the metadata")

    p = sub.add_parser("to-kohya", help="standard kohya LoRA (lora_down/lora_up/alpha) for A1111, Forge, ComfyUI",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _convert_args(p)
    p.add_argument("--naming", default=None, choices=["sgm", "bfl", "diffusers"],
                   help="denoiser names: SDXL sgm (sd-scripts, default) or diffusers; FLUX bfl (sd-scripts' fused qkv, default, "
                        "what ComfyUI and Forge load) or diffusers (lora_transformer_*); SD1/2 always diffusers")

    p = sub.add_parser("to-diffusers", help="diffusers/PEFT LoRA (unet.<path>.lora_A.weight) for pipe.load_lora_weights",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _convert_args(p)

    p = sub.add_parser("import-official", help="official T-LoRA SD-XL or FLUX.1 checkpoint -> native file",
                       epilog="examples:\n  python -m converters import-official ckpt/pytorch_lora_weights.safetensors out.safetensors "
                       "--hparams hparams.yml\n  python -m converters import-official run/checkpoint-1000/lora.pt flux.safetensors "
                       "--hparams run/logs/hparams.yml\n(rank/min_rank/power from the options, else from hparams.yml: lora_rank or "
                       "rank, min_rank, alpha_rank_scale; min_rank defaults to 1 as in the official code. FLUX's lora.pt is a "
                       "pickle: it is read with torch.load(weights_only=True), which refuses anything but tensors, so no code runs)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--hparams", default=None, help="the run's hparams.yml")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--min-rank", type=int, default=None)
    p.add_argument("--power", type=float, default=None, help="rank schedule power (official: alpha_rank_scale)")
    p.add_argument("--no-mask", action="store_true", help="the run trained without timestep masks (plain LoRA / Ortho-LoRA)")
    p.add_argument("--naming", default=None, choices=["sgm", "diffusers"],
                   help="SD-XL: names in the native file (sgm, the default: what sd-scripts uses); FLUX files keep diffusers names")

    p = sub.add_parser("import-lycoris", help="LyCORIS algo=tlora file -> native file",
                       epilog="example: python -m converters import-lycoris lyco.safetensors out.safetensors --base-model ./sdxl-base "
                       "--min-rank 32\nLyCORIS does not save the frozen copy; it is rebuilt from the SVD of the base model's weights.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--base-model", required=True, help="diffusers model folder (unet/, text_encoder/, text_encoder_2/ safetensors)")
    p.add_argument("--min-rank", type=int, default=1, help="min_rank the run used (LyCORIS default 1)")
    p.add_argument("--power", type=float, default=1.0, help="rank schedule power")
    p.add_argument("--sig-type", default="principal", choices=["principal", "last", "middle"],
                   help="LyCORIS sig_type of the run (its loader uses principal)")
    p.add_argument("--no-mask", action="store_true", help="import as ortho (no timestep mask)")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from networks.tlora_format import TLoRAFormatError

    from .core import ConversionError
    from .errors import describe_failure

    try:
        if args.command == "info":
            from .info import describe

            print(describe(args.input, show_metadata=not args.no_metadata))
        elif args.command in ("to-kohya", "to-diffusers"):
            from .convert import convert_file

            report = convert_file(
                args.input, args.output, target="kohya" if args.command == "to-kohya" else "diffusers", mask=args.mask,
                rank=args.rank, keep_energy=args.keep_energy, dtype=args.dtype, naming=getattr(args, "naming", None),
                base=args.base, model_card=args.model_card, layers_per_block=args.layers_per_block,
                instance_prompt=args.instance_prompt, base_model=args.base_model, dry_run=args.dry_run,
            )
            print(report.text(args.worst))
        elif args.command == "import-official":
            from .importers import import_official

            summary = import_official(args.input, args.output, rank=args.rank, min_rank=args.min_rank, power=args.power,
                                      hparams=args.hparams, masked=not args.no_mask, naming_mode=args.naming)
            print(f"{args.input} -> {args.output}: {summary}")
        elif args.command == "import-lycoris":
            from .importers import import_lycoris

            summary = import_lycoris(args.input, args.output, args.base_model, min_rank=args.min_rank, power=args.power,
                                     sig_type=args.sig_type, masked=not args.no_mask)
            print(f"{args.input} -> {args.output}: {summary}")
    except (ConversionError, TLoRAFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - OS and file-writer failures become one line; anything else is a bug
        message = describe_failure(e, getattr(args, "output", None) or getattr(args, "input", None))
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
