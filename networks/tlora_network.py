"""The network: which layers are adapted (as the model's family descriptor says), the
denoiser's timestep hook, and every method sd-scripts calls on a network object (REFERENCE §3),
for training (train_network.py, sdxl_train_network.py, flux_train_network.py) and for its
generation scripts."""

import logging
import os
import weakref
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from .tlora_families import DenoiserLayout, Family, TextEncoderSlot, describe_supported, family_of_model, kohya_name
from .tlora_format import (
    NetworkConfig,
    TLoRAFormatError,
    TrainingOptions,
    group_by_layer,
    read_safetensors,
    validate_layer_tensors,
    validate_native,
    write_native,
)
from .tlora_layer import FactorisedAdapter, OrthoSampler, TimestepState, layer_shape

logger = logging.getLogger(__name__)


def as_module(model):
    """sd-scripts' generation scripts wrap the U-Net in an object that is not an nn.Module and
    forwards attribute access to `.delegate`; hooks must go on the real module."""
    if model is None or isinstance(model, torch.nn.Module):
        return model
    delegate = getattr(model, "delegate", None)
    return delegate if isinstance(delegate, torch.nn.Module) else model


def as_list(text_encoder) -> list:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


class Target:
    """One layer to adapt: its kohya name, the module, whether it is a kxk convolution, whether it
    is a denoiser layer, and (for one part of a fused layer) the output rows it covers."""

    __slots__ = ("name", "module", "is_kxk", "in_denoiser", "rows")

    def __init__(self, name, module, is_kxk, in_denoiser, rows=None):
        self.name, self.module, self.is_kxk, self.in_denoiser, self.rows = name, module, is_kxk, in_denoiser, rows


def _children_of_blocks(root, block_classes: Iterable[str]):
    """(path of the block, block, child path inside it, child) for every Linear / Conv2d inside a
    block of one of the given classes, each child once, in the model's order. By class name,
    never isinstance: sd-scripts' own models and diffusers' share the names but not the classes."""
    block_classes = set(block_classes)
    seen = set()
    for name, module in root.named_modules():
        if module.__class__.__name__ not in block_classes:
            continue
        for child_name, child in module.named_modules():
            if child.__class__.__name__ not in ("Linear", "Conv2d") or id(child) in seen:
                continue
            seen.add(id(child))
            yield name, module, child_name, child


def text_encoder_targets(text_encoder, slot: TextEncoderSlot) -> List[Target]:
    model = as_module(text_encoder)
    found = []
    for block_path, _, child_path, child in _children_of_blocks(model, slot.classes):
        if child.__class__.__name__ == "Linear":
            path = slot.module_path(model, f"{block_path}.{child_path}")
            found.append(Target(kohya_name(slot.prefix, path), child, False, False))
    return found


def denoiser_targets(denoiser, layout: DenoiserLayout, config: NetworkConfig, include_conv: bool, attention_only: bool) -> List[Target]:
    """The layers of a denoiser to adapt, as its layout and the config say (targets, conv_dim,
    FLUX block selection and split_qkv)."""
    classes = layout.block_classes + (layout.conv_block_classes if include_conv else ())
    found = []
    for block_path, _, child_path, child in _children_of_blocks(denoiser, classes):
        path = f"{block_path}.{child_path}"
        is_kxk = child.__class__.__name__ == "Conv2d" and tuple(child.kernel_size) != (1, 1)
        if is_kxk and not include_conv:
            continue
        if attention_only and not path.endswith(layout.attention_layers):
            continue
        if not _block_selected(layout, config, path):
            continue
        if config.split_qkv and layout.name == "bfl":
            found.extend(_split_targets(path, child, attention_only))
            continue
        found.append(Target(kohya_name(layout.prefix, path), child, is_kxk, True))
    return found


def _block_selected(layout: DenoiserLayout, config: NetworkConfig, path: str) -> bool:
    block = layout.block_of(path + ".")
    if block is None:
        return True
    kind, index = block
    if config.train_blocks not in ("all", kind):
        return False
    chosen = config.train_double_block_indices if kind == "double" else config.train_single_block_indices
    return chosen is None or index in chosen


def _split_targets(path: str, module, attention_only: bool) -> List[Target]:
    """split_qkv: the parts of a fused FLUX layer, each an adapter of its own rows, named as
    diffusers names the part (lora_transformer_...), which ComfyUI and Forge map to the same
    rows; unfused layers are one part. With targets=attention the MLP part of linear1 is left out."""
    from .tlora_families import FLUX_BFL, FLUX_DIFFUSERS, flux_bfl_to_diffusers

    parts = flux_bfl_to_diffusers(path, int(module.out_features))
    if len(parts) == 1:
        return [Target(kohya_name(FLUX_BFL.prefix, path), module, False, True)]
    if attention_only:
        parts = [part for part in parts if part.path.endswith(FLUX_DIFFUSERS.attention_layers)]
    return [Target(kohya_name(FLUX_DIFFUSERS.prefix, part.path), module, False, True, (part.start, part.rows)) for part in parts]


def _tensors_in(output) -> List[torch.Tensor]:
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors_in(item)]
    if isinstance(output, Mapping):
        return [t for item in output.values() for t in _tensors_in(item)]
    sample = getattr(output, "sample", None)
    return [sample] if torch.is_tensor(sample) else []


def _queue_backward_callback(fn) -> None:
    try:
        torch.autograd.Variable._execution_engine.queue_callback(fn)
    except (AttributeError, RuntimeError):
        pass


class TimestepHook:
    """Sets the per-sample rank mask from the denoiser's own timestep argument, with no patch of
    the host trainer. Where the argument is and how it maps to the schedule's t (t itself for
    SD, sigma · T for flow-matching models) is the family layout's `TimestepArgument`.

    The pre-hook records this forward's timesteps; the post-hook clears them (so text encoders
    and bare layer calls run all ranks) and, if the output will be differentiated, registers a
    gradient hook on it that puts this forward's timesteps back when backward reaches the
    denoiser. Gradient checkpointing recomputes the layers only after that point, so the
    recomputation sees the mask of the forward being differentiated even if another (no-grad)
    denoiser call ran in between."""

    def __init__(self, state: TimestepState, denoiser: torch.nn.Module, layout: DenoiserLayout):
        self.state = state
        self.argument = layout.timestep
        self.handles = [
            denoiser.register_forward_pre_hook(self._before, with_kwargs=True),
            denoiser.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _before(self, module, args, kwargs):
        values = self.argument.read(args, kwargs)
        self.state.set(None if values is None else self.argument.schedule_t(values, self.state.num_train_timesteps))

    def _after(self, module, args, kwargs, output):
        snapshot = self.state.snapshot()
        self.state.set(None)
        if snapshot[0] is None or not torch.is_grad_enabled():
            return None
        state = self.state

        def restore(grad):
            state.restore(snapshot)
            _queue_backward_callback(lambda: state.set(None))
            return None

        for tensor in _tensors_in(output):
            if tensor.requires_grad:
                tensor.register_hook(restore)
        return None

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


class TLoRANetwork(torch.nn.Module):
    """Adapters for the denoiser (U-Net / DiT) and the text encoders, kohya style: each adapter
    replaces its layer's forward; the network owns the shared timestep state and the hooks.

    What is adapted comes from the model's family descriptor (networks/tlora_families.py): its
    denoiser layout (blocks, attention layers, kohya prefix, timestep argument) and its text
    encoder slots. `layer_ranks` ({name: (rank, alpha)}, from a file) restricts the network to the
    layers of that file."""

    def __init__(
        self,
        text_encoders,
        unet,
        config: NetworkConfig,
        training: Optional[TrainingOptions] = None,
        multiplier: float = 1.0,
        layer_ranks: Optional[Dict[str, Tuple[int, Optional[float]]]] = None,
        initialise: bool = True,
    ):
        super().__init__()
        text_encoders = as_list(text_encoders)
        unet = as_module(unet)
        self.family: Optional[Family] = family_of_model(unet, text_encoders)
        self.layout: Optional[DenoiserLayout] = self.family.layout_of_model(unet) if self.family is not None else None
        if unet is not None and self.layout is None:
            raise TLoRAFormatError(
                f"networks.tlora does not know the model {type(unet).__name__} (children: "
                f"{', '.join(n for n, _ in unet.named_children())[:200]}); supported: {describe_supported()}"
            )
        if self.family is not None:
            config.options_for_family(self.family.name)
            config.family = config.family or self.family.name
            config.layout = config.layout or self.layout.name
        self.config = config
        self.training_options = training or TrainingOptions()
        self.multiplier = multiplier
        self.timestep_state = TimestepState(config.rank_schedule_power, config.num_train_timesteps)
        self._timestep_hook: Optional[TimestepHook] = None
        self._ortho_hook = None
        # sd-scripts' FLUX trainer reads this attribute right after creating the network
        self.train_t5xxl = bool(config.train_t5xxl) or (layer_ranks is not None and any(n.startswith("lora_te3_") for n in layer_ranks))

        targets = self._targets(text_encoders, unet, config, layer_ranks)
        self.text_encoder_loras: List[FactorisedAdapter] = []
        self.unet_loras: List[FactorisedAdapter] = []
        opts = self.training_options
        sampler = OrthoSampler()
        if initialise and config.spec.init == "ortho" and config.init_source == "random" and layer_ranks is None:
            shapes = []
            for target in targets:
                rank = config.layer_settings(target.is_kxk)[0]
                if rank is not None:
                    in_features, out_features, kernel = layer_shape(target.module)
                    if target.rows is not None:
                        out_features = target.rows[1]
                    shapes.append((in_features * kernel[0] * kernel[1], out_features, rank))
            sampler.prepare(shapes)  # batched draws: one QR call per shape instead of two per layer
        for target in targets:
            rank, alpha, min_rank = config.layer_settings(target.is_kxk)
            if layer_ranks is not None:
                file_rank, file_alpha = layer_ranks[target.name]
                if config.spec.masked and target.in_denoiser and file_rank != rank:
                    raise TLoRAFormatError(f"layer {target.name!r} has rank {file_rank} in the file but its metadata says {rank}")
                rank, alpha = file_rank, file_alpha
                min_rank = min(min_rank if min_rank is not None else rank, rank)
            if rank is None:
                continue
            layer = FactorisedAdapter(
                target.name,
                target.module,
                config.algo,
                rank,
                alpha,
                min_rank=min_rank,
                multiplier=multiplier,
                dropout=opts.dropout,
                rank_dropout=opts.rank_dropout,
                module_dropout=opts.module_dropout,
                init=config.init,
                init_source=config.init_source,
                ortho_sampler=sampler,
                initialise=initialise,
                output_rows=target.rows,
            )
            if target.in_denoiser and config.spec.masked:
                layer.timestep_state = self.timestep_state
            (self.unet_loras if target.in_denoiser else self.text_encoder_loras).append(layer)
            self.add_module(target.name, layer)
        logger.info(
            "networks.tlora: %s, algo=%s rank=%s alpha=%s min_rank=%s: %d text encoder and %d %s layers",
            self.family.title if self.family else "text encoders only", config.algo, config.rank, config.alpha, config.min_rank,
            len(self.text_encoder_loras), len(self.unet_loras), "U-Net" if not (self.family and self.family.flow_matching) else "DiT",
        )
        if config.ortho_reg > 0:
            self._register_ortho_penalty()

    def _targets(self, text_encoders, unet, config: NetworkConfig, layer_ranks) -> List[Target]:
        """Every layer to adapt: the text encoders' (per the family's slots) and the denoiser's."""
        targets: List[Target] = []
        if text_encoders:
            slots = self.family.text_encoder_slots(len(text_encoders)) if self.family else self._generic_slots(len(text_encoders))
            for slot, text_encoder in zip(slots, text_encoders):
                if text_encoder is None:
                    continue
                if slot.option is not None and not getattr(self, slot.option, False):
                    continue
                targets.extend(text_encoder_targets(text_encoder, slot))
        if unet is not None:
            include_conv = config.conv_rank is not None or layer_ranks is not None
            attention_only = config.targets == "attention" and layer_ranks is None
            selection = config if layer_ranks is None else NetworkConfig(split_qkv=config.split_qkv)
            targets.extend(denoiser_targets(unet, self.layout, selection, include_conv, attention_only))
        if layer_ranks is not None:
            known = {t.name for t in targets}
            unmatched = sorted(set(layer_ranks) - known)
            if unmatched:
                raise TLoRAFormatError(
                    f"{len(unmatched)} layer(s) of the file match no layer of this model, e.g. {unmatched[:3]}; the file was "
                    f"trained for another model family ({self.family.title if self.family else 'no denoiser given'} here) or "
                    f"another text encoder setup"
                )
            targets = [t for t in targets if t.name in layer_ranks]
        return targets

    @staticmethod
    def _generic_slots(count: int) -> List[TextEncoderSlot]:
        """Text encoders without a denoiser (a text-encoder-only network): sd-scripts' SD names."""
        from .tlora_families import CLIP_CLASSES

        prefixes = ["lora_te"] if count == 1 else [f"lora_te{i + 1}" for i in range(count)]
        return [TextEncoderSlot(prefix, CLIP_CLASSES, root="text_model") for prefix in prefixes]

    # ------------------------------------------------------------------ layers

    @property
    def loras(self) -> List[FactorisedAdapter]:
        return self.text_encoder_loras + self.unet_loras

    def _drop_layers(self, layers: List[FactorisedAdapter]) -> None:
        for layer in layers:
            delattr(self, layer.lora_name)
        layers.clear()

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder=True, apply_unet=True):
        """Replace the forwards of the target layers; hook the U-Net for the timestep mask."""
        if not apply_text_encoder:
            self._drop_layers(self.text_encoder_loras)
        if not apply_unet:
            self._drop_layers(self.unet_loras)
        for layer in self.loras:
            layer.apply_to()
        logger.info("networks.tlora: enabled %d text encoder and %d U-Net layers", len(self.text_encoder_loras), len(self.unet_loras))
        if self.config.spec.masked and self.unet_loras and unet is not None:
            self.hook_unet(unet)

    def hook_unet(self, unet) -> None:
        """Put the timestep hook on the denoiser (U-Net or DiT) the host will call."""
        if self._timestep_hook is not None:
            self._timestep_hook.remove()
        self._timestep_hook = TimestepHook(self.timestep_state, as_module(unet), self.layout)

    def remove(self) -> None:
        """Undo apply_to: original forwards back, hooks removed. Newest wrapper first: the parts of a
        split_qkv layer wrap one module in a chain, each holding the previous part's forward."""
        for layer in reversed(self.loras):
            layer.remove()
        if self._timestep_hook is not None:
            self._timestep_hook.remove()
            self._timestep_hook = None
        if self._ortho_hook is not None:
            self._ortho_hook.remove()
            self._ortho_hook = None

    def set_fixed_mask(self, mode) -> None:
        """None: every U-Net call uses the mask of its own timestep (T-LoRA). "full", "mean" or
        "t=<int>": one time-independent mask for every call, e.g. to compare with a converted file."""
        self.timestep_state.set_fixed(mode)

    def set_multiplier(self, multiplier):
        self.multiplier = multiplier
        for layer in self.loras:
            layer.multiplier = multiplier

    def set_enabled(self, is_enabled: bool):
        for layer in self.loras:
            layer.enabled = is_enabled

    # ------------------------------------------------------------------ training hooks of sd-scripts

    def prepare_network(self, args):
        save_as = getattr(args, "save_model_as", None)
        if save_as is not None and save_as != "safetensors":
            raise TLoRAFormatError(f"networks.tlora writes only safetensors; use --save_model_as safetensors (got {save_as!r})")

    def enable_gradient_checkpointing(self):
        pass  # the U-Net checkpoints; the timestep hook keeps masks right under recomputation

    def prepare_grad_etc(self, text_encoder, unet):
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def on_step_start(self, text_encoder, unet):
        pass  # the mask comes from the U-Net call itself, not from the step

    def get_trainable_params(self):
        return [p for p in self.parameters() if p.requires_grad]

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        """Parameter groups (text encoder(s), U-Net; LoRA+ 'plus' groups for the up factors) and
        one description per group, as sd-scripts expects."""
        self.requires_grad_(True)
        opts = self.training_options
        groups, descriptions = [], []

        def add(layers, lr, ratio, label):
            main, plus = [], []
            for layer in layers:
                for pname, param in layer.named_parameters():
                    (plus if ratio is not None and pname.startswith(layer.keys["up"].split(".")[0]) else main).append(param)
            for params, suffix, group_lr in ((main, "", lr), (plus, " plus", None if lr is None or ratio is None else lr * ratio)):
                if not params or group_lr is None or group_lr == 0:
                    continue
                groups.append({"params": params, "lr": group_lr})
                descriptions.append(label + suffix)

        if self.text_encoder_loras:
            prefixes = sorted({layer.lora_name.split("_")[1] for layer in self.text_encoder_loras})  # te / te1 / te2 / te3
            # the lr list is indexed by the host's text encoder position (FLUX: te1 = CLIP-L -> [0],
            # te3 = T5 -> [1], also when CLIP-L has no layers), as lora_flux / sdxl lora do
            slot_prefixes = [slot.prefix.split("_")[1] for slot in self.family.text_encoders] if self.family is not None else []
            slots = [slot_prefixes.index(p) if p in slot_prefixes else i for i, p in enumerate(prefixes)]
            if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 0):
                lrs = [default_lr] * len(prefixes)
            elif isinstance(text_encoder_lr, (list, tuple)):
                lrs = [float(text_encoder_lr[min(i, len(text_encoder_lr) - 1)]) for i in slots]
            else:
                lrs = [float(text_encoder_lr)] * len(prefixes)
            ratio = opts.loraplus_text_encoder_lr_ratio or opts.loraplus_lr_ratio
            numbered = len(prefixes) > 1 or len(slot_prefixes) > 1
            for slot, prefix, lr in zip(slots, prefixes, lrs):
                layers = [layer for layer in self.text_encoder_loras if layer.lora_name.split("_")[1] == prefix]
                add(layers, lr, ratio, f"textencoder {slot + 1}" if numbered else "textencoder")
        if self.unet_loras:
            add(self.unet_loras, unet_lr if unet_lr is not None else default_lr, opts.loraplus_unet_lr_ratio or opts.loraplus_lr_ratio, "unet")
        return groups, descriptions

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
        return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)

    # ------------------------------------------------------------------ TriLoRA orthogonality option

    def _register_ortho_penalty(self):
        """γ(‖PᵀP − I‖² + ‖QQᵀ − I‖²) enters through the gradients right before each optimiser
        step (sd-scripts adds no loss of a network's). The step pre-hook runs after a GradScaler
        has unscaled the gradients and after DDP has averaged them, so the penalty is added once
        per step, unscaled, identically on every rank."""
        network = weakref.ref(self)

        def hook(optimizer, args, kwargs):
            net = network()
            if net is not None:
                net.add_orthogonality_gradient(optimizer)

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self._ortho_hook = register_optimizer_step_pre_hook(hook)

    @torch.no_grad()
    def add_orthogonality_gradient(self, optimizer=None) -> None:
        gamma = self.config.ortho_reg
        owned = None if optimizer is None else {id(p) for group in optimizer.param_groups for p in group["params"]}
        for layer in self.loras:
            for role, transpose in (("up", False), ("down", True)):
                param = layer.factor(role)
                if owned is not None and id(param) not in owned:
                    continue
                matrix = param.reshape(param.shape[0], -1).float()
                if transpose:  # Q [R, in]: penalise QQᵀ − I by working on Qᵀ
                    matrix = matrix.T
                eye = torch.eye(matrix.shape[1], device=matrix.device)
                grad = 4.0 * gamma * matrix @ (matrix.T @ matrix - eye)
                if transpose:
                    grad = grad.T
                grad = grad.reshape(param.shape).to(param.dtype)
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)

    def orthogonality_penalty(self) -> torch.Tensor:
        """γ Σ (‖PᵀP − I‖² + ‖QQᵀ − I‖²) over layers (for logging and tests)."""
        total = torch.zeros(())
        for layer in self.loras:
            p = layer.factor("up").reshape(layer.factor("up").shape[0], -1).float()
            q = layer.factor("down").reshape(layer.rank, -1).float()
            eye = torch.eye(layer.rank, device=p.device)
            total = total + ((p.T @ p - eye) ** 2).sum().cpu() + ((q @ q.T - eye) ** 2).sum().cpu()
        return self.config.ortho_reg * total

    # ------------------------------------------------------------------ regularisation

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device):
        """Scale each layer's change down to a Frobenius norm of at most max_norm_value (all
        ranks active). λ forms scale λ and λ0 together, which scales the change exactly."""
        keys_scaled = 0
        norms = []
        for layer in self.loras:
            change = layer.delta_weight().to(device) * layer.scale
            norm = change.norm().clamp(min=max_norm_value / 2)
            desired = torch.clamp(norm, max=max_norm_value)
            ratio = (desired / norm).item()
            if ratio != 1:
                keys_scaled += 1
                if layer.spec.has_lambda:
                    layer.factor("lambda").mul_(ratio)
                    if layer.spec.has_base:
                        layer.factor("lambda_base").mul_(ratio)
                else:
                    layer.factor("up").mul_(ratio**0.5)
                    layer.factor("down").mul_(ratio**0.5)
            norms.append(change.norm().item() * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)

    # ------------------------------------------------------------------ files

    def save_weights(self, file, dtype, metadata):
        root, ext = os.path.splitext(file)
        if ext != ".safetensors":
            logger.warning("networks.tlora writes only safetensors: saving %s.safetensors instead of %s", root, file)
            file = root + ".safetensors"
        state_dict = self.state_dict()
        if dtype is not None:
            state_dict = {k: v.detach().to("cpu", dtype=dtype) for k, v in state_dict.items()}
        # validated like any file we read: a diverged (NaN) network is refused, not written
        write_native(state_dict, file, self.config, metadata)

    def check_state_dict(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Refuse a state dict that does not fit this network, before anything is changed."""
        own = self.state_dict()
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise TLoRAFormatError(
                f"{source}: {len(unexpected)} tensor(s) do not belong to this network (algo={self.config.algo}), "
                f"e.g. {unexpected[:3]}; was it trained with another algo, model family or text encoder setting?"
            )
        # a layer that is in the file must be there whole: loading part of it would mix trained
        # and initial factors silently (whole layers may be absent, e.g. text encoder layers)
        own_layers = group_by_layer({k: v for k, v in own.items()})
        for name, layer_tensors in group_by_layer(tensors).items():
            missing = sorted(set(own_layers[name]) - set(layer_tensors) - {"alpha"})
            if missing:
                raise TLoRAFormatError(f"{source}: layer {name!r} lacks {missing} (truncated or edited file?)")
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise TLoRAFormatError(
                    f"{source}: {key} has shape {tuple(value.shape)}, this network needs {tuple(own[key].shape)} "
                    f"(different network_dim / conv_dim?)"
                )
            if not value.is_floating_point():
                raise TLoRAFormatError(f"{source}: {key} has dtype {value.dtype}, expected floating point")

    def load_weights(self, file):
        tensors, metadata = read_safetensors(file)
        validate_native(tensors, metadata, file)
        self.check_state_dict(tensors, file)
        return self.load_state_dict(tensors, strict=False)

    # ------------------------------------------------------------------ generation scripts

    def is_mergeable(self):
        return True

    @torch.no_grad()
    def merge_to(self, text_encoder, unet, weights_sd, dtype, device):
        """Add every layer's change (all ranks: a merged weight cannot follow the timestep) into
        the wrapped weights, as sd-scripts' --network_merge and --base_weights expect."""
        if weights_sd is not None:
            self.check_state_dict(weights_sd, "weights")
            self.load_state_dict(weights_sd, strict=False)
        for layer in self.loras:
            self._add_to_weight(layer, layer.multiplier, device, dtype)
        logger.info("networks.tlora: merged %d layers", len(self.loras))

    @staticmethod
    def _add_to_weight(layer: FactorisedAdapter, multiplier, device=None, dtype=None):
        module = layer.org_module
        weight = module.weight
        change = layer.delta_weight().to(weight.device if device is None else device) * (multiplier * layer.scale)
        if layer.output_rows is not None:  # one part of a fused layer: its rows only
            start, count = layer.output_rows
            change = torch.nn.functional.pad(change, (0, 0, start, weight.shape[0] - start - count))
        merged = weight.detach().to(change.device, torch.float32) + change
        module.weight.data = merged.to(weight.device, weight.dtype if dtype is None else dtype)

    def backup_weights(self):
        for layer in self.loras:
            module = layer.org_module
            if not hasattr(module, "_lora_org_weight"):
                module._lora_org_weight = module.weight.detach().clone()
                module._lora_restored = True

    def restore_weights(self):
        for layer in self.loras:
            module = layer.org_module
            if hasattr(module, "_lora_org_weight") and not getattr(module, "_lora_restored", True):
                module.weight.data = module._lora_org_weight.clone()
                module._lora_restored = True
                layer.enabled = True

    @torch.no_grad()
    def pre_calculation(self):
        for layer in self.loras:
            self._add_to_weight(layer, layer.multiplier)
            layer.org_module._lora_restored = False
            layer.enabled = False


def layer_ranks_from_tensors(tensors: Mapping[str, torch.Tensor], algo: str) -> Dict[str, Tuple[int, Optional[float]]]:
    """{layer name: (rank, alpha)} of a file's tensors, validating every layer."""
    ranks = {}
    for name, layer_tensors in group_by_layer(tensors).items():
        rank = validate_layer_tensors(name, layer_tensors, algo)
        alpha = layer_tensors.get("alpha")
        ranks[name] = (rank, None if alpha is None else float(alpha.float().item()))
    return ranks
