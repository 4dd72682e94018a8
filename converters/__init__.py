"""converters: T-LoRA / Ortho-LoRA / TriLoRA files (networks.tlora's native format) to standard
kohya and diffusers/PEFT LoRA files, imports from the official T-LoRA code and LyCORIS, and
timestep-aware sampling in diffusers (converters.diffusers.apply_tlora).

    tlora-convert --help            (or: python -m converters --help)
    from converters import convert_file
    report = convert_file("tlora.safetensors", "tlora_kohya.safetensors", target="kohya", mask="mean")
    print(report.text())
"""

from .convert import Report, convert_file, write_model_card
from .core import ConversionError, LoadedLora, load_lora
from .importers import import_lycoris, import_official
from .info import describe

__all__ = [
    "convert_file", "Report", "write_model_card", "ConversionError", "LoadedLora", "load_lora", "import_official",
    "import_lycoris", "describe",
]
