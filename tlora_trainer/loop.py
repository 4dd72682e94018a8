"""The training loop, in the order diffusers' example scripts follow: accelerator, base model,
network, optimiser and schedule, cached data, resume, then the loop itself in `Trainer.train`,
which reads top to bottom; each step's parts are small methods below it.

Divergence rule: a checkpoint is good only if its weights and optimiser state are finite AND the
loss computed with those weights is finite. So the state of step k is written at step k+1, right
after that step's loss (computed with the weights of step k) came out finite and before its
update is applied; non-finite gradients stop a step before the optimiser applies it, and
non-finite weights after an update stop the run before anything of them is saved. Every state
folder on disk is therefore good, and `--resume latest` never picks a diverged one.
"""

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from . import checkpoints, models, outputs
from .data import load_image_tensor, sample_index
from .errors import NonFiniteLoss, OutputError, UsageError
from .fileio import writing
from .optimizers import build_optimizer
from .preflight import RunPlan
from .sampling import Sampler, save_png

logger = logging.getLogger("train_tlora")


def compute_loss(prediction, target):
    """Mean squared error in float32 (module level, so tests can inject a NaN)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


class TrainingModule(torch.nn.Module):
    """What accelerate wraps for DDP: the network's parameters (a child module), with the U-Net
    and text encoders held outside the module tree (frozen, never broadcast)."""

    def __init__(self, network, unet, conditioner, train_text_encoder):
        super().__init__()
        self.network = network
        self._frozen = [unet, conditioner]
        self.train_text_encoder = train_text_encoder

    def forward(self, noisy_latents, timesteps, input_ids, cached_hidden, cached_added):
        unet, conditioner = self._frozen
        if self.train_text_encoder:
            hidden, added = conditioner.encode(input_ids, noisy_latents.device)
        else:
            hidden, added = cached_hidden, cached_added
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        return unet(noisy_latents, timesteps, hidden.to(noisy_latents.dtype), **kwargs).sample


@dataclasses.dataclass
class TrainResult:
    output: Optional[str]  # the native network file (main process), None elsewhere
    step: int
    digest: str  # sha256 of the network weights
    outputs: List[str]
    network: object = None


@dataclasses.dataclass
class Batch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    input_ids: list
    cached_hidden: Optional[torch.Tensor]
    cached_added: Optional[dict]


@dataclasses.dataclass
class PendingCheckpoint:
    """A checkpoint due at `step`, written once the next loss shows its weights are good."""

    step: int
    rng: checkpoints.RngState


def weights_digest(network) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(network.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


def cpu_only_launch() -> bool:
    """A multi-process launch on a machine without CUDA: accelerate 1.15 sets up gloo DDP on CPUs
    only when asked for the CPU; 1.6 did it by itself."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and not torch.cuda.is_available()


class Trainer:
    def __init__(self, args, plan: RunPlan):
        self.args = args
        self.plan = plan
        args.seed = 42 if args.seed is None else args.seed
        self.seed = args.seed
        self.width, self.height = plan.resolution
        self.total = args.max_train_steps
        self.batch_size = args.train_batch_size
        self.train_text_encoder = not args.network_train_unet_only
        self.train_unet = not args.network_train_text_encoder_only
        self.step = 0
        self.pending: Optional[PendingCheckpoint] = None
        self.last_good: Optional[str] = None  # newest state folder whose weights gave a finite loss
        self.checkpoints_written = False
        self.samples_written: List[str] = []
        self.recent_losses: List[float] = []
        self.first_loss: Optional[float] = None
        self.tensorboard = None

    # ------------------------------------------------------------------ the run

    def train(self) -> TrainResult:
        self.set_up_accelerator()
        self.load_base_model()
        self.create_network()
        self.create_optimizer()
        self.cache_data()
        self.prepare()
        self.resume()
        self.open_outputs()
        self.announce()
        if self.args.sample_at_first and self.step == 0:
            self.sample(0)
        self.network.train()
        with tqdm(total=self.total, initial=self.step, disable=not self.main_process, desc="steps", dynamic_ncols=True) as progress:
            while self.step < self.total:
                batch = self.draw_batch(self.step, self.noise_generator)
                loss = self.forward(batch)
                self.stop_unless_finite(loss)
                self.write_pending_checkpoint()  # its weights just gave a finite loss
                self.update(loss)
                self.step += 1
                self.log(loss.item(), progress)
                if self.checkpoint_due():
                    self.pending = PendingCheckpoint(self.step, checkpoints.RngState.capture(self.noise_generator))
                if self.sample_due():
                    self.sample(self.step)
                self.after_step(self.step)
        self.verify_final_weights()
        return self.finish()

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (tests use it to interrupt a run)."""

    # ------------------------------------------------------------------ setting up

    def set_up_accelerator(self) -> None:
        args = self.args
        self.accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu_only_launch())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched != self.world:  # every process would train alone and write the same files
            raise UsageError(
                f"the launcher started {launched} processes but accelerate set up {self.world}; on a machine without GPUs "
                f"use `accelerate launch --multi_gpu --num_processes N` (gloo), or start one process"
            )
        self.device = self.accelerator.device
        self.main_process = self.accelerator.is_main_process
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
        self.save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(args.save_precision)
        if self.plan.model.kind == "random" and self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)  # the tiny models' ops are too small to gain from threads; spinning threads cost more
        set_seed(self.seed)  # identical network init on every rank (DDP also broadcasts it)

    def load_base_model(self) -> None:
        args = self.args
        self.base = models.load_base_model(args.pretrained_model_name_or_path, self.plan.model, self.seed)
        b = self.base
        self.family = models.family_of_model(b.unet, b.text_encoders)
        if args.v_parameterization:
            b.noise_scheduler.register_to_config(prediction_type="v_prediction")
        for model in (b.vae, b.unet, *b.text_encoders):
            model.requires_grad_(False)
            model.eval()
        b.vae.to(self.device, dtype=torch.float32)
        b.unet.to(self.device, dtype=self.weight_dtype)
        for te in b.text_encoders:
            te.to(self.device, dtype=self.weight_dtype)
        if args.xformers:
            try:
                b.unet.enable_xformers_memory_efficient_attention()
            except Exception as e:  # noqa: BLE001 - missing package or unsupported GPU
                logger.warning("xformers is not available (%s); using PyTorch SDPA attention", e)
        if args.gradient_checkpointing:
            b.unet.enable_gradient_checkpointing()
            b.unet.train()  # diffusers checkpoints only in training mode in some versions; no dropout in SD U-Nets
            if self.train_text_encoder:
                for te in b.text_encoders:
                    te.gradient_checkpointing_enable()
                    te.train()

    def create_network(self) -> None:
        import networks.tlora as tlora

        args, b = self.args, self.base
        self.network = tlora.create_network(
            1.0, args.network_dim, args.network_alpha, b.vae, b.text_encoders if self.train_text_encoder else None, b.unet,
            neuron_dropout=args.network_dropout, **self.plan.network_kwargs,
        )
        self.network.apply_to(b.text_encoders, b.unet, apply_text_encoder=self.train_text_encoder, apply_unet=self.train_unet)
        if args.network_weights:
            self.network.load_weights(args.network_weights)
            logger.info("loaded network weights from %s", args.network_weights)
        if not self.network.loras:
            raise UsageError("the network adapts no layer of this model (check targets / network_train_* options)")

    def create_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        args = self.args
        te_lr = args.text_encoder_lr
        if isinstance(te_lr, list) and len(te_lr) == 1:
            te_lr = te_lr[0]
        groups, self.group_descriptions = self.network.prepare_optimizer_params_with_multiple_te_lrs(te_lr, args.unet_lr, args.learning_rate)
        self.optimizer = build_optimizer(args, groups, self.plan.optimizer_options)
        self.lr_scheduler = get_scheduler(args.lr_scheduler, self.optimizer, num_warmup_steps=args.lr_warmup_steps,
                                          num_training_steps=self.total)
        self.network.prepare_grad_etc(self.base.text_encoders, self.base.unet)

    def cache_data(self) -> None:
        """Latents (no augmentation, so once) and, with frozen text encoders, text embeddings."""
        b, samples = self.base, self.plan.samples
        self.conditioner = models.Conditioner(self.family, b.tokenizers, b.text_encoders, self.args.clip_skip, self.width, self.height)
        cache_generator = torch.Generator().manual_seed(self.seed)
        self.latents = []
        with torch.no_grad():
            for sample in samples:
                pixels = load_image_tensor(sample.path, self.width, self.height)[None].to(self.device, torch.float32)
                dist = b.vae.encode(pixels).latent_dist
                noise = torch.randn(dist.mean.shape, generator=cache_generator).to(self.device)
                latents = (dist.mean + dist.std * noise) * b.vae.config.scaling_factor
                self.latents.append(latents[0].to(self.weight_dtype))
        self.order = [i for i, s in enumerate(samples) for _ in range(s.repeats)]
        captions = sorted({s.caption for s in samples})
        self.token_ids = {c: [ids[0] for ids in self.conditioner.tokenize([c])] for c in captions}
        self.text_cache = {}
        if not self.train_text_encoder:
            with torch.no_grad():
                for caption in captions:
                    self.text_cache[caption] = self.conditioner.encode([ids[None] for ids in self.token_ids[caption]], self.device)

    def prepare(self) -> None:
        module = TrainingModule(self.network, self.base.unet, self.conditioner, self.train_text_encoder)
        self.model, self.optimizer = self.accelerator.prepare(module, self.optimizer)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.noise_generator = torch.Generator().manual_seed(self.seed * 7919 + self.rank + 1)

    def resume(self) -> None:
        saved = self.plan.resume
        if saved is None:
            return
        self.step = checkpoints.apply_state(
            saved, rank=self.rank, world=self.world, network=self.network, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            scaler=self.accelerator.scaler, noise_generator=self.noise_generator,
        )
        self.last_good = saved.folder
        self.accelerator.print(f"resumed from {saved.folder} at step {self.step}")

    def open_outputs(self) -> None:
        args = self.args
        if self.main_process:
            with writing(args.output_dir):
                os.makedirs(args.output_dir, exist_ok=True)
            checkpoints.remove_stale_temporaries(args.output_dir, args.output_name)
        self.accelerator.wait_for_everyone()
        self.sample_dir = os.path.join(args.output_dir, "sample")
        if self.plan.prompts:
            self.sampler = Sampler(self.plan.prompts, self.base, self.family.name, args.sample_sampler, self.seed, self.width,
                                   self.height, self.weight_dtype)
        if args.logging_dir and self.main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("--logging_dir: TensorBoard logging needs the tensorboard package (pip install tensorboard); not logging")
            else:
                run = (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime())
                with writing(args.logging_dir):
                    self.tensorboard = SummaryWriter(os.path.join(args.logging_dir, run))

    def announce(self) -> None:
        config = self.network.config
        self.accelerator.print(
            f"training {config.algo} rank {config.rank} on {len(self.plan.samples)} image(s) ({len(self.order)} with repeats), "
            f"{self.family.name} model, {self.width}x{self.height}, {self.world} process(es) x batch {self.batch_size}, "
            f"steps {self.step}->{self.total}; groups: {', '.join(self.group_descriptions)}"
        )

    # ------------------------------------------------------------------ one step

    def draw_batch(self, step: int, generator: torch.Generator) -> Batch:
        """The data and noise of `step` for this process: a function of seed, step and rank only."""
        args, scheduler, device = self.args, self.base.noise_scheduler, self.device
        positions = [(step * self.world + self.rank) * self.batch_size + j for j in range(self.batch_size)]
        indices = [self.order[sample_index(p, len(self.order), self.seed)] for p in positions]
        latents = torch.stack([self.latents[i] for i in indices]).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        if args.noise_offset:
            noise = noise + args.noise_offset * torch.randn((self.batch_size, latents.shape[1], 1, 1), generator=generator).to(device, latents.dtype)
        lo = 0 if args.min_timestep is None else args.min_timestep
        hi = 1000 if args.max_timestep is None else args.max_timestep
        timesteps = torch.randint(lo, hi, (self.batch_size,), generator=generator).to(device)
        noisy = scheduler.add_noise(latents.float(), noise.float(), timesteps).to(self.weight_dtype)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents.float(), noise.float(), timesteps)
        else:
            target = noise
        captions = [self.plan.samples[i].caption for i in indices]
        input_ids = [torch.stack([self.token_ids[c][k] for c in captions]) for k in range(len(self.base.tokenizers))]
        hidden = added = None
        if not self.train_text_encoder:
            hidden = torch.cat([self.text_cache[c][0] for c in captions])
            if self.text_cache[captions[0]][1] is not None:
                added = {k: torch.cat([self.text_cache[c][1][k] for c in captions]) for k in self.text_cache[captions[0]][1]}
        return Batch(noisy, timesteps, target, input_ids, hidden, added)

    def forward(self, batch: Batch, model=None) -> torch.Tensor:
        with self.accelerator.autocast():
            prediction = (model or self.model)(batch.noisy, batch.timesteps, batch.input_ids, batch.cached_hidden, batch.cached_added)
        return compute_loss(prediction, batch.target)

    def _everywhere(self, flag: bool) -> bool:
        """True only if `flag` is true on every process (so all of them stop together)."""
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() == self.world)

    def _last_good_text(self) -> str:
        return self.last_good or "none (no --save_every_n_steps checkpoint was written yet)"

    def stop_unless_finite(self, loss: torch.Tensor) -> None:
        if self._everywhere(bool(torch.isfinite(loss.detach()))):
            return
        unsaved = ""
        if self.pending is not None:
            unsaved = f" The weights after step {self.pending.step} gave this loss, so their checkpoint was not written."
            self.pending = None
        raise NonFiniteLoss(
            f"the loss is not finite (NaN/inf: {loss.item()}) at step {self.step + 1}; training stopped and the weights of this step were not "
            f"applied or saved.{unsaved} The last good checkpoint is {self._last_good_text()}. Lower the learning rate, "
            f"use bf16 instead of fp16, or check the data; resume with --resume latest"
        )

    def update(self, loss: torch.Tensor) -> None:
        """Backward, clip and step, refusing an update that is not finite."""
        args = self.args
        self.accelerator.backward(loss)
        norm = None
        if args.max_grad_norm and args.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, args.max_grad_norm)
        # fp16 loss scaling skips steps with inf gradients by design; otherwise they mean divergence.
        # The clipping norm, when there is one, is not finite if any gradient is not (or if it
        # overflows, which is divergence too), so it saves a second pass over the gradients.
        grads_finite = bool(torch.isfinite(norm)) if norm is not None else checkpoints.all_finite(
            [p.grad for p in self.params if p.grad is not None])
        if self.accelerator.scaler is None and not grads_finite:
            raise NonFiniteLoss(
                f"the gradients at step {self.step + 1} are not finite although the loss is; the step was not applied. "
                f"The last good checkpoint is {self._last_good_text()}. Lower the learning rate or --max_grad_norm; resume with --resume latest"
            )
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not checkpoints.all_finite(self.params):
            raise NonFiniteLoss(
                f"the update of step {self.step + 1} made weights NaN or infinite (the learning rate is too large?); nothing of it "
                f"was saved. The last good checkpoint is {self._last_good_text()}. Lower the learning rate; resume with --resume latest"
            )

    def log(self, loss: float, progress) -> None:
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.recent_losses = (self.recent_losses + [loss])[-20:]
        lr = self.lr_scheduler.get_last_lr()
        progress.update(1)
        progress.set_postfix(loss=f"{sum(self.recent_losses) / len(self.recent_losses):.4f}", lr=f"{lr[0]:.2e}")
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss/current", loss, self.step)
            self.tensorboard.add_scalar("lr/unet", lr[-1], self.step)

    def checkpoint_due(self) -> bool:
        every = self.args.save_every_n_steps
        return bool(every) and self.step % every == 0 and self.step < self.total

    def sample_due(self) -> bool:
        every = self.args.sample_every_n_steps
        return bool(every) and self.step % every == 0

    # ------------------------------------------------------------------ checkpoints and samples

    def _collectively(self, action: Callable[[], None], main_only: bool, what: str) -> None:
        """Run a write on the main process (or on every process); all processes learn whether it
        worked everywhere, so none waits forever for one that failed."""
        error = None
        if self.main_process or not main_only:
            try:
                action()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others were told
                error = e
        if not self._everywhere(error is None) and error is None:
            raise OutputError(f"another process could not write {what}; see its message")
        if error is not None:
            raise error

    def metadata(self, step: int):
        return outputs.build_metadata(self.args, self.family, self.plan.resolution, step, self.plan.samples)

    def write_pending_checkpoint(self) -> None:
        pending, self.pending = self.pending, None
        if pending is None:
            return
        args = self.args
        name = checkpoints.state_dir_name(args.output_name, pending.step)
        final = os.path.join(args.output_dir, name)
        tmp = os.path.join(args.output_dir, f".{name}.tmp")
        try:
            self._collectively(lambda: _fresh_folder(tmp), True, tmp)
            self._collectively(lambda: pending.rng.write(os.path.join(tmp, checkpoints.rng_file(self.rank))), False, tmp)
            self._collectively(lambda: self._complete_checkpoint(tmp, final, pending.step), True, final)
        finally:
            if self.main_process and os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing half-written
        self.last_good = final
        self.checkpoints_written = True

    def _complete_checkpoint(self, tmp: str, final: str, step: int) -> None:
        args = self.args
        checkpoints.write_state_files(
            tmp, step=step, world=self.world, network=self.network, network_metadata=self.metadata(step), optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, scaler=self.accelerator.scaler, config=outputs.resolved_config(args),
        )
        checkpoints.publish_state_folder(tmp, final, args.output_dir, args.output_name, step)
        weights = os.path.join(args.output_dir, f"{args.output_name}-step{step:08d}.safetensors")
        with writing(weights):
            self.network.save_weights(weights, self.save_dtype, self.metadata(step))

    def sample(self, step: int) -> None:
        if not self.plan.prompts or not self.main_process:
            return
        grid = self.sampler.render(self.network, self.accelerator.autocast, compare_base=self.args.sample_compare_base)
        path = os.path.join(self.sample_dir, f"{self.args.output_name}_{step:08d}.png")
        save_png(grid, path)
        self.samples_written.append(path)
        if self.tensorboard is not None:
            import numpy as np

            self.tensorboard.add_image("samples", np.asarray(grid), step, dataformats="HWC")

    # ------------------------------------------------------------------ the end

    def verify_final_weights(self) -> None:
        """The final weights are good only if they are finite and the loss computed with them is:
        one more forward pass on the next batch, on copies of the generators (the training RNG
        does not notice)."""
        generator = torch.Generator().set_state(self.noise_generator.get_state())
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            loss = self.forward(self.draw_batch(self.step, generator), model=self.accelerator.unwrap_model(self.model))
        if self._everywhere(checkpoints.all_finite(self.params) and bool(torch.isfinite(loss))):
            return
        raise NonFiniteLoss(
            f"the final weights give a non-finite loss ({loss.item()}); no final file was written. The last good checkpoint is "
            f"{self._last_good_text()}. Lower the learning rate; resume with --resume latest"
        )

    def finish(self) -> TrainResult:
        args = self.args
        digest = weights_digest(self.network)
        if self.world > 1:
            digests = gather_object([digest])
            losses = gather_object([self.first_loss])
            if len(set(digests)) != 1:
                raise RuntimeError(f"DDP ranks diverged: weight digests {digests}")
            self.accelerator.print(f"DDP check: {self.world} ranks hold identical weights (sha256 {digest}); first losses per rank {losses}")
        native = os.path.join(args.output_dir, f"{args.output_name}.safetensors")
        written: List[str] = []
        self._collectively(lambda: written.extend(self._write_final_outputs(native)), True, native)
        self.accelerator.wait_for_everyone()
        return TrainResult(native if self.main_process else None, self.step, digest, written, self.network)

    def _write_final_outputs(self, native: str) -> List[str]:
        args = self.args
        with writing(native):
            self.network.save_weights(native, self.save_dtype, self.metadata(self.step))
        converted = []
        try:
            converted = outputs.convert_outputs(native, args, self.family, self.base.unet)
        except OutputError:
            raise
        except Exception as e:  # noqa: BLE001 - the native file is written; report and go on
            logger.error("conversion failed (%s); the native file %s is complete", e, native)
        config_path = os.path.join(args.output_dir, f"{args.output_name}.toml")
        outputs.write_resolved_config(config_path, args)
        if self.tensorboard is not None:
            self.tensorboard.close()
        self.accelerator.print(outputs.summary(
            args, native, converted, config_path, self.sample_dir, self.samples_written, self.checkpoints_written,
            self.plan.model.kind == "random", self.tensorboard is not None,
        ))
        return [native, *converted, config_path]


def _fresh_folder(path: str) -> None:
    with writing(path):
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
