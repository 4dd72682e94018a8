"""The factorised adapter layer every algorithm shares, its initialisations and the rank schedule.

One layer computes, for an input x of the wrapped Linear / Conv2d,

    y = org(x) + multiplier · alpha/R · ( up · diag(c) · down(x)  −  up0 · diag(c0) · down0(x) )

with c = λ ⊙ m and c0 = λ0 ⊙ m, where λ is a trainable diagonal (ones for plain LoRA), m the
per-sample rank mask (timestep mask ⊙ rank dropout; ones when absent) and the second term a
frozen copy that exists only for the Ortho forms (T-LoRA, Ortho-LoRA). Plain LoRA, vanilla
T-LoRA, Ortho-LoRA, full T-LoRA and TriLoRA differ only in which of λ / m / base they carry and
in how the factors start.
"""

import concurrent.futures
import dataclasses
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .tlora_format import ALGOS, DEFAULT_NUM_TRAIN_TIMESTEPS, key_names

# ----------------------------------------------------------------------------- rank schedule


def active_rank_count(timesteps, rank: int, min_rank: int, power: float = 1.0, num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """T-LoRA's r(t) = floor(((T - t) / T) ** p * (R - r_min)) + r_min, per timestep.

    t = 0 (no noise) keeps all R ranks, t = T-1 keeps about r_min. Computed in float64 so that
    the floor lands where the formula's exact arithmetic puts it. Returns a long tensor.
    """
    t = torch.as_tensor(timesteps).detach().to(torch.float64).reshape(-1)
    t = t.clamp(0, num_train_timesteps)
    fraction = ((num_train_timesteps - t) / num_train_timesteps) ** power
    count = torch.floor(fraction * (rank - min_rank)).long() + min_rank
    return count.clamp(min_rank, rank)


def rank_mask(active_ranks: torch.Tensor, rank: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(B, R) mask whose row b keeps the first active_ranks[b] ranks (the lowest indices)."""
    device = active_ranks.device if device is None else device
    positions = torch.arange(rank, device=device)
    return (positions[None, :] < active_ranks.to(device)[:, None]).to(dtype)


def mean_rank_mask(rank: int, min_rank: int, power: float = 1.0, num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """m̄_i = fraction of t in 0..T-1 at which rank i is active (float64, shape (R,)).

    The time-independent mask that minimises the expected squared error of the weight change
    over uniformly drawn training timesteps."""
    counts = active_rank_count(torch.arange(num_train_timesteps), rank, min_rank, power, num_train_timesteps)
    return rank_mask(counts, rank, torch.float64).mean(dim=0)


def parse_mask_mode(mode) -> Optional[str]:
    """Normalise a fixed-mask choice: None (follow the timestep), "full", "mean" or "t=<int>"."""
    if mode is None:
        return None
    text = str(mode).strip().lower().replace(" ", "")
    if text in ("", "none", "timestep"):
        return None
    if text in ("full", "mean"):
        return text
    number = text[2:] if text.startswith("t=") else text
    if number.isdigit():
        return f"t={int(number)}"
    raise ValueError(f"mask={mode!r} is unknown; accepted: timestep (default), full, mean, t=<0..T-1> (e.g. t=500)")


def fixed_rank_mask(mode: str, rank: int, min_rank: int, power: float = 1.0, num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The time-independent mask vector [R] (float64) of a fixed mode: full, mean or t=<int>."""
    mode = parse_mask_mode(mode)
    if mode is None or mode == "full":
        return torch.ones(rank, dtype=torch.float64)
    if mode == "mean":
        return mean_rank_mask(rank, min_rank, power, num_train_timesteps)
    t = int(mode[2:])
    if not 0 <= t < num_train_timesteps:
        raise ValueError(f"mask t={t} is outside 0..{num_train_timesteps - 1}")
    return rank_mask(active_rank_count(torch.tensor([t]), rank, min_rank, power, num_train_timesteps), rank, torch.float64)[0]


class TimestepState:
    """The timesteps of the U-Net forward in progress, shared by the masked layers of a network.

    `timesteps` is None outside a U-Net forward: layers then run all ranks. Masks are cached
    per (rank, min_rank, device, dtype) for the current forward so that hundreds of layers do
    not rebuild the same (B, R) tensor.
    """

    def __init__(self, power: float = 1.0, num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS):
        self.power = power
        self.num_train_timesteps = num_train_timesteps
        self.timesteps: Optional[torch.Tensor] = None
        self._masks: Dict[tuple, torch.Tensor] = {}
        self.fixed_mode: Optional[str] = None  # "full" | "mean" | "t=<int>": ignore the timesteps
        self._fixed_masks: Dict[tuple, Optional[torch.Tensor]] = {}

    def set_fixed(self, mode) -> None:
        """Pin one time-independent mask for every call (comparisons, merged-like sampling)."""
        self.fixed_mode = parse_mask_mode(mode)
        self._fixed_masks = {}

    def set(self, timesteps: Optional[torch.Tensor]) -> None:
        self.timesteps = timesteps
        self._masks = {}

    def snapshot(self):
        return (self.timesteps, self._masks)

    def restore(self, snapshot) -> None:
        self.timesteps, self._masks = snapshot

    def mask(self, rank: int, min_rank: int, device, dtype) -> Optional[torch.Tensor]:
        if self.fixed_mode is not None:
            key = (rank, min_rank, str(device), dtype)
            if key not in self._fixed_masks:
                vector = None
                if self.fixed_mode != "full":
                    vector = fixed_rank_mask(self.fixed_mode, rank, min_rank, self.power, self.num_train_timesteps)
                    vector = vector.to(device=device, dtype=dtype)[None, :]
                self._fixed_masks[key] = vector
            return self._fixed_masks[key]
        if self.timesteps is None:
            return None
        key = (rank, min_rank, str(device), dtype)
        mask = self._masks.get(key)
        if mask is None:
            counts = active_rank_count(self.timesteps, rank, min_rank, self.power, self.num_train_timesteps)
            mask = rank_mask(counts.to(device), rank, dtype, device)
            self._masks[key] = mask
        return mask


# ----------------------------------------------------------------------------- initialisation


def haar_orthonormal(rows: int, cols: int, count: Optional[int] = None, transposed: bool = False) -> torch.Tensor:
    """(rows x cols) matrices with orthonormal columns, uniformly (Haar) distributed; `count` of
    them stacked in one batch when given; `transposed` returns them as (cols x rows) with
    orthonormal rows (Ortho-LoRA's Q), laid out contiguously.

    The singular vectors of a Gaussian matrix are Haar-distributed, so this gives Ortho-LoRA's P
    and Q without the SVD of every layer: the Q factor of a QR of a Gaussian G whose R has a
    positive diagonal. For tall G that is G·L⁻ᵀ with L the Cholesky factor of GᵀG (Cholesky-QR:
    matrix products only, about twice as fast as Householder QR here); for nearly square G, whose
    Gram matrix can be ill-conditioned, Householder QR with the sign fix."""
    batch = 1 if count is None else count
    gaussian = torch.randn(batch, rows, cols, dtype=torch.float32)
    if rows >= 4 * cols:
        gram = (gaussian.transpose(1, 2) @ gaussian).double()
        chol = torch.linalg.cholesky(gram)
        eye = torch.eye(cols, dtype=torch.float64).expand(batch, cols, cols)
        chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False).float()
        if transposed:
            frames = chol_inv @ gaussian.transpose(1, 2)
        else:
            frames = gaussian @ chol_inv.transpose(1, 2)
    else:
        q, r = torch.linalg.qr(gaussian)
        signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        signs[signs == 0] = 1
        frames = q * signs.unsqueeze(-2)
        if transposed:
            frames = frames.transpose(1, 2).contiguous()
    return frames if count is not None else frames[0]


def _chi_bidiagonal(rows: int, cols: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Diagonal and superdiagonal of the chi bidiagonal matrix whose singular values are
    distributed as those of a rows x cols standard Gaussian matrix (Dumitriu & Edelman):
    diagonal χ_m, χ_{m-1}, …, superdiagonal χ_{n-1}, …, χ_1 (n = min, m = max)."""
    n, m = min(rows, cols), max(rows, cols)
    d = torch.sqrt(2.0 * torch._standard_gamma(torch.arange(m, m - n, -1, dtype=torch.float64) / 2.0))
    e = torch.sqrt(2.0 * torch._standard_gamma(torch.arange(n - 1, 0, -1, dtype=torch.float64) / 2.0)) if n > 1 else torch.zeros(0, dtype=torch.float64)
    return d, e


def _bidiagonal_singular_values(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, float64) of the upper bidiagonal matrix (d, e), from the
    symmetric tridiagonal BᵀB: diagonal d_j² + e_{j-1}², off-diagonal d_j·e_j. No random numbers
    are drawn here, so it may run on another thread without changing seeded results."""
    main = d.square()
    main[1:] += e.square()
    tridiagonal = torch.diag(main)
    if d.numel() > 1:
        off = d[:-1] * e
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.sqrt(torch.linalg.eigvalsh(tridiagonal).clamp(min=0)).flip(0)


def gaussian_singular_values(rows: int, cols: int, std: float) -> torch.Tensor:
    """All min(rows, cols) singular values (descending) of a rows x cols matrix with N(0, std²)
    entries, drawn without forming that matrix: Golub–Kahan bidiagonalisation maps a Gaussian
    matrix to a bidiagonal one with independent chi-distributed entries, with the same
    distribution of singular values, leaving only an n x n tridiagonal eigenproblem."""
    return (_bidiagonal_singular_values(*_chi_bidiagonal(rows, cols)) * std).to(torch.float32)


def singular_slice(count: int, rank: int, init: str) -> slice:
    """Which `rank` of `count` descending singular values an init takes: last (smallest, T-LoRA
    default), principal (largest) or middle."""
    if rank > count:
        raise ValueError(f"rank {rank} exceeds the {count} singular values available")
    if init == "last":
        return slice(count - rank, count)
    if init == "principal":
        return slice(0, rank)
    if init == "middle":
        start = math.ceil((count - rank) / 2)
        return slice(start, start + rank)
    raise ValueError(f"unknown init {init!r}")


class OrthoSampler:
    """Draws Ortho-LoRA factors for many layers at once: (P [out, R], λ [R], Q [R, in])
    distributed as the chosen singular triplets of a Gaussian in x out matrix with std 1/R
    (T-LoRA's init), which are independent: Haar frames P and Q, and a spectrum that depends only
    on the shape. The spectrum is drawn once per shape ((n, m) and (m, n) share it) and frames
    are drawn in one batch per shape after `prepare`, to keep network creation fast."""

    def __init__(self):
        self._spectra: Dict[Tuple[int, int], torch.Tensor] = {}
        self._frames: Dict[Tuple[int, int, bool], list] = {}

    def prepare(self, shapes) -> None:
        """shapes: (in_features, out_features, rank) of every layer about to be initialised."""
        shapes = list(shapes)
        counts: Dict[Tuple[int, int, bool], int] = {}
        for fan_in, fan_out, rank in shapes:
            for key in ((fan_in, rank, True), (fan_out, rank, False)):  # Q [R, in] rows, P [out, R] columns
                counts[key] = counts.get(key, 0) + 1
        # the spectra (small LAPACK eigenproblems) are drawn on a second thread while this one
        # draws the frames (large random fills and matrix products): both cores work
        # (random draws stay on this thread, in a fixed order, so seeded runs are reproducible)
        spectrum_keys = sorted({(min(i, o), max(i, o)) for i, o, _ in shapes} - set(self._spectra))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            futures = {key: pool.submit(_bidiagonal_singular_values, *_chi_bidiagonal(*key)) for key in spectrum_keys}
            for (rows, rank, transposed), count in counts.items():
                batch = haar_orthonormal(rows, rank, count, transposed)
                # views of one batch; atomic_save_safetensors copies views that share storage
                self._frames.setdefault((rows, rank, transposed), []).extend(batch.unbind(0))
            for key, future in futures.items():
                self._spectra[key] = future.result().to(torch.float32)

    def frame(self, rows: int, rank: int, transposed: bool = False) -> torch.Tensor:
        pending = self._frames.get((rows, rank, transposed))
        if pending:
            return pending.pop()
        return haar_orthonormal(rows, rank, transposed=transposed)

    def spectrum(self, rows: int, cols: int) -> torch.Tensor:
        key = (min(rows, cols), max(rows, cols))
        if key not in self._spectra:
            self._spectra[key] = gaussian_singular_values(rows, cols, 1.0)
        return self._spectra[key]

    def factors(self, in_features: int, out_features: int, rank: int, init: str):
        spectrum = self.spectrum(in_features, out_features)
        lam = spectrum[singular_slice(spectrum.numel(), rank, init)] / rank
        q = self.frame(in_features, rank, transposed=True)
        p = self.frame(out_features, rank)
        return p, lam, q


def ortho_factors_random(in_features: int, out_features: int, rank: int, init: str, sampler: Optional[OrthoSampler] = None):
    """One layer's (P, λ, Q); see OrthoSampler."""
    return (sampler or OrthoSampler()).factors(in_features, out_features, rank, init)


def ortho_factors_from_weight(weight: torch.Tensor, rank: int, init: str):
    """(P, λ, Q) from the SVD of the pretrained weight (out x in): principal = PiSSA-like."""
    u, s, vh = torch.linalg.svd(weight.detach().float().reshape(weight.shape[0], -1), full_matrices=False)
    sel = singular_slice(s.numel(), rank, init)
    return u[:, sel].contiguous(), s[sel].contiguous(), vh[sel].contiguous()


# ----------------------------------------------------------------------------- the layer


class _Factor(torch.nn.Module):
    """Holds one factor matrix as `weight`, so state_dict keys read `<role>.weight` as in kohya."""

    def __init__(self, tensor: torch.Tensor, trainable: bool):
        super().__init__()
        if trainable:
            self.weight = torch.nn.Parameter(tensor)
        else:
            self.register_buffer("weight", tensor)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_enabled() or (device_type == "cpu" and torch.is_autocast_cpu_enabled())


def _is_conv(module) -> bool:
    return module.__class__.__name__ == "Conv2d"


def layer_shape(module) -> Tuple[int, int, Tuple[int, int]]:
    """(in_features, out_features, kernel) of a Linear or Conv2d, by class name (sd-scripts' and
    diffusers' models use torch's classes, possibly subclassed or wrapped)."""
    if _is_conv(module):
        return module.in_channels, module.out_channels, tuple(module.kernel_size)
    return module.in_features, module.out_features, (1, 1)


def _scale_rank_dim(factor: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """up factor [out, R(,1,1)] times a rank vector [R] on its rank dimension."""
    if factor.dim() == 4:
        return factor * coef[None, :, None, None]
    return factor * coef[None, :]


def apply_up(hidden: torch.Tensor, up: torch.Tensor, coef: Optional[torch.Tensor], frozen: bool = False) -> torch.Tensor:
    """up · diag(coef) applied to the rank-space activations `hidden`.

    coef is None, [R] (shared by the batch) or [B, R] (one row per sample). For trainable
    factors the per-sample case folds the coefficients into a per-sample up matrix and uses one
    batched matmul when a sample has more positions than the layer has outputs (U-Net layers at
    SD resolutions): autograd then keeps only `hidden` (and the per-sample matrix, smaller than a
    second copy of `hidden`) for backward, as plain LoRA keeps `hidden`. When the layer has at
    least as many outputs as a sample has positions (FLUX's wide qkv / MLP / modulation layers,
    small images), the per-sample matrix [B, out, R] would be the larger and slower object, so
    `hidden` is scaled instead, as always for the frozen copy (`frozen`), where nothing needs a
    weight gradient and autograd then keeps only the [B, R] coefficients."""
    batch = hidden.shape[0]
    scale_hidden = frozen
    if not frozen and coef is not None and coef.dim() == 2 and coef.shape[0] > 1:
        positions = hidden.numel() // max(1, batch * hidden.shape[1 if up.dim() == 4 else -1])
        scale_hidden = positions <= up.shape[0]  # same math, the cheaper order (see above)
    if scale_hidden and coef is not None:
        # scale the activations, not the weight: a scaled weight copy would be kept for backward
        coef = coef.to(hidden.dtype).reshape(-1, coef.shape[-1])  # [1 or B, R]
        if up.dim() == 4:  # 1x1 conv as a matmul: conv2d would keep its input for backward
            scaled = (hidden * coef[:, :, None, None]).reshape(batch, hidden.shape[1], -1)
            return torch.matmul(up.reshape(up.shape[0], up.shape[1]), scaled).reshape(batch, up.shape[0], *hidden.shape[2:])
        return F.linear(hidden * coef.reshape(coef.shape[0], *([1] * (hidden.dim() - 2)), coef.shape[-1]), up)
    if coef is not None and coef.dim() == 2 and coef.shape[0] == 1:
        coef = coef[0]
    if coef is None or coef.dim() == 1:
        weight = up if coef is None else _scale_rank_dim(up, coef.to(up.dtype))
        return F.conv2d(hidden, weight) if up.dim() == 4 else F.linear(hidden, weight)
    per_sample = up.reshape(up.shape[0], up.shape[1])[None, :, :] * coef.to(up.dtype)[:, None, :]  # [B, out, R]
    if up.dim() == 4:  # 1x1 conv on [B, R, H, W]
        flat = hidden.reshape(batch, hidden.shape[1], -1)
        return torch.bmm(per_sample, flat).reshape(batch, up.shape[0], *hidden.shape[2:])
    flat = hidden.reshape(batch, -1, hidden.shape[-1])
    return torch.bmm(flat, per_sample.transpose(1, 2)).reshape(*hidden.shape[:-1], up.shape[0])


def dense_delta(down: torch.Tensor, up: torch.Tensor, coef: Optional[torch.Tensor]) -> torch.Tensor:
    """The weight-space form of up · diag(coef) · down, shaped like the wrapped layer's weight
    ([out, in] or [out, in, kh, kw]); coef None or [R]."""
    up2 = up.reshape(up.shape[0], up.shape[1])
    if coef is not None:
        up2 = up2 * coef.to(up2.dtype)[None, :]
    return (up2 @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])


@dataclasses.dataclass
class LayerFactors:
    """One layer's factors as plain tensors, and its change in weight space:

        change = alpha/R · ( up·diag(c ⊙ m)·down − up0·diag(c0 ⊙ m)·down0 )

    c = λ (ones when the algo has none), c0 = λ0; the second term exists for the Ortho forms
    only; m is a time-independent rank mask, applied when the layer is `masked` (a denoiser
    layer of a masked algo). The adapter module and the converters both compute the change here."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    lam: Optional[torch.Tensor] = None
    down0: Optional[torch.Tensor] = None
    up0: Optional[torch.Tensor] = None
    lam0: Optional[torch.Tensor] = None
    masked: bool = False
    min_rank: int = 0
    power: float = 1.0
    num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (int(self.up.shape[0]), *self.down.shape[1:])

    @classmethod
    def from_tensors(cls, name: str, tensors, algo: str, masked: bool = False, min_rank: Optional[int] = None,
                     power: float = 1.0, num_train_timesteps: int = DEFAULT_NUM_TRAIN_TIMESTEPS) -> "LayerFactors":
        """From one layer's file tensors ({key suffix: tensor}); alpha missing or 0 means scale 1."""
        keys = key_names(algo)
        down = tensors[keys["down"]]
        rank = int(down.shape[0])
        alpha = float(tensors["alpha"].float().item()) if "alpha" in tensors else 0.0
        factors = cls(name, down, tensors[keys["up"]], alpha if alpha != 0 else float(rank))
        if "lambda" in keys:
            factors.lam = tensors[keys["lambda"]]
        if "lambda_base" in keys:
            factors.down0, factors.up0, factors.lam0 = tensors[keys["down_base"]], tensors[keys["up_base"]], tensors[keys["lambda_base"]]
        if masked and ALGOS[algo].masked:
            factors.masked = True
            factors.min_rank = rank if min_rank is None else min(int(min_rank), rank)
            factors.power = float(power)
            factors.num_train_timesteps = int(num_train_timesteps)
        return factors

    def mask_vector(self, mode=None) -> Optional[torch.Tensor]:
        """The fixed mask [R] (float64) of a mode (full, mean, t=<int>); None when the layer is not
        masked or the mask keeps every rank."""
        mode = parse_mask_mode(mode)
        if not self.masked or mode is None or mode == "full":
            return None
        return fixed_rank_mask(mode, self.rank, self.min_rank, self.power, self.num_train_timesteps)

    def coefficients(self, mask: Optional[torch.Tensor], dtype=torch.float64):
        """(c ⊙ m, c0 ⊙ m) for a mask vector (None: all ranks); each None when it is all ones /
        absent."""
        m = None if mask is None else mask.to(dtype)
        c = None if self.lam is None else self.lam.to(dtype)
        if m is not None:
            c = m if c is None else c * m
        c0 = None
        if self.up0 is not None:
            c0 = self.lam0.to(dtype) if self.lam0 is not None else torch.ones(self.rank, dtype=dtype)
            if m is not None:
                c0 = c0 * m
        return c, c0

    def delta(self, mask: Optional[torch.Tensor] = None, dtype=torch.float64, scaled: bool = True) -> torch.Tensor:
        """The change shaped like the layer's weight, for a mask vector (None: all ranks).
        float64 by default: the Ortho forms subtract two nearly equal products early in training."""
        c, c0 = self.coefficients(mask, dtype)
        change = dense_delta(self.down.to(dtype), self.up.to(dtype), c)
        if self.up0 is not None:
            change = change - dense_delta(self.down0.to(dtype), self.up0.to(dtype), c0)
        return change * self.scale if scaled else change

    def factor_stack(self, mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(up [out, k], down [k, fan_in]) in float64 with up @ down = the unscaled change: k = R,
        or 2R for the Ortho forms ([P·c, −P0·c0] and [Q; Q0]); ranks the mask turns off dropped."""
        c, c0 = self.coefficients(mask)
        keep = torch.ones(self.rank, dtype=torch.bool) if mask is None else mask != 0
        if not bool(keep.any()):
            keep[0] = True  # a rank-0 LoRA is not a file format; one zero column is exact
        ones = torch.ones(self.rank, dtype=torch.float64)
        up2 = self.up.double().reshape(self.up.shape[0], self.rank)
        ups = [(up2 * (c if c is not None else ones)[None, :])[:, keep]]
        downs = [self.down.double().reshape(self.rank, -1)[keep]]
        if self.up0 is not None:
            ups.append(-(self.up0.double().reshape(self.up0.shape[0], self.rank) * c0[None, :])[:, keep])
            downs.append(self.down0.double().reshape(self.rank, -1)[keep])
        return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


class FactorisedAdapter(torch.nn.Module):
    """One adapted Linear / Conv2d. Replaces `org_module.forward` (as sd-scripts' LoRA does);
    the wrapped module keeps its weights and the adapter adds its change."""

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        algo: str,
        rank: int,
        alpha: Optional[float],
        min_rank: Optional[int] = None,
        multiplier: float = 1.0,
        dropout: Optional[float] = None,
        rank_dropout: Optional[float] = None,
        module_dropout: Optional[float] = None,
        init: str = "last",
        init_source: str = "random",
        ortho_sampler: Optional[OrthoSampler] = None,
        initialise: bool = True,
        output_rows: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.algo = algo
        self.spec = ALGOS[algo]
        self.keys = key_names(algo)
        self.rank = rank
        self.min_rank = rank if min_rank is None else min_rank
        self.in_features, self.out_features, self.kernel_size = layer_shape(org_module)
        # (start, count): the adapter changes only these output rows, one part of a fused layer
        # (sd-scripts' FLUX qkv / linear1 with split_qkv); None: every row
        self.output_rows = None if output_rows is None else (int(output_rows[0]), int(output_rows[1]))
        if self.output_rows is not None:
            start, count = self.output_rows
            if start < 0 or count < 1 or start + count > self.out_features:
                raise ValueError(f"{lora_name}: rows {start}..{start + count} are outside the layer's {self.out_features} outputs")
            self.out_features = count
        self.is_conv = _is_conv(org_module)
        if self.is_conv and self.output_rows is not None:
            raise ValueError(f"{lora_name}: row parts are for Linear layers only")
        self.stride = tuple(org_module.stride) if self.is_conv else None
        self.padding = org_module.padding if self.is_conv else None
        self.dilation = tuple(org_module.dilation) if self.is_conv else None
        if self.is_conv and getattr(org_module, "groups", 1) != 1:
            raise ValueError(f"{lora_name}: grouped convolutions are not supported")

        alpha = float(rank if alpha is None or float(alpha) == 0 else alpha)
        self.scale = alpha / rank
        self.register_buffer("alpha", torch.tensor(alpha))
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.timestep_state: Optional[TimestepState] = None  # set by the network on masked U-Net layers
        self.enabled = True
        self.org_module_ref = [org_module]  # a list, so the wrapped module is not a child of ours
        self.org_forward = None

        down, up, lam = self._initial_factors(org_module, init, init_source, ortho_sampler, initialise)
        self._register(down, up, lam)

    # -- construction

    def _down_shape(self):
        if self.is_conv:
            return (self.rank, self.in_features, *self.kernel_size)
        return (self.rank, self.in_features)

    def _up_shape(self):
        return (self.out_features, self.rank, 1, 1) if self.is_conv else (self.out_features, self.rank)

    def _initial_factors(self, org_module, init, init_source, ortho_sampler, initialise):
        down_shape, up_shape = self._down_shape(), self._up_shape()
        fan_in = math.prod(down_shape[1:])
        if not initialise:  # about to be overwritten by a loaded file
            lam = torch.zeros(self.rank) if self.spec.has_lambda else None
            return torch.zeros(down_shape), torch.zeros(up_shape), lam
        kind = self.spec.init
        if kind == "ortho":
            limit = min(fan_in, self.out_features)
            if self.rank > limit:
                raise ValueError(
                    f"{self.lora_name}: rank {self.rank} is larger than this layer allows for an orthogonal "
                    f"init ({fan_in} in, {self.out_features} out); use network_dim <= {limit}"
                )
            if init_source == "weight":
                weight = org_module.weight
                if self.output_rows is not None:
                    weight = weight[self.output_rows[0]:self.output_rows[0] + self.output_rows[1]]
                p, lam, q = ortho_factors_from_weight(weight, self.rank, init)
            else:
                p, lam, q = ortho_factors_random(fan_in, self.out_features, self.rank, init, ortho_sampler)
            return q.reshape(down_shape), p.reshape(up_shape), lam
        down = torch.empty(down_shape)
        up = torch.empty(up_shape)
        if kind == "gaussian":  # official T-LoRA: down ~ N(0, 1/R), up = 0
            torch.nn.init.normal_(down, std=1.0 / self.rank)
            torch.nn.init.zeros_(up)
            return down, up, None
        if kind == "kaiming":  # sd-scripts' LoRA: kaiming-uniform down, zero up
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            torch.nn.init.zeros_(up)
            return down, up, None
        # TriLoRA: P and Q kaiming-uniform, λ = 0, so the change starts at zero
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        torch.nn.init.kaiming_uniform_(up, a=math.sqrt(5))
        return down, up, torch.zeros(self.rank)

    def _register(self, down, up, lam):
        keys = self.keys
        setattr(self, keys["down"].split(".")[0], _Factor(down.contiguous(), trainable=True))
        setattr(self, keys["up"].split(".")[0], _Factor(up.contiguous(), trainable=True))
        if self.spec.has_lambda:
            self.register_parameter(keys["lambda"], torch.nn.Parameter(lam.clone()))
        if self.spec.has_base:  # frozen copies as buffers: saved, moved, cast, never trained
            setattr(self, keys["down_base"].split(".")[0], _Factor(down.clone().contiguous(), trainable=False))
            setattr(self, keys["up_base"].split(".")[0], _Factor(up.clone().contiguous(), trainable=False))
            self.register_buffer(keys["lambda_base"], lam.clone())

    # -- factor access by role

    def factor(self, role: str) -> Optional[torch.Tensor]:
        key = self.keys.get(role)
        if key is None:
            return None
        holder = getattr(self, key.split(".")[0])
        return holder.weight if key.endswith(".weight") else holder

    @property
    def org_module(self):
        return self.org_module_ref[0]

    # -- hooking into the wrapped module

    def apply_to(self):
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def remove(self):
        """Give the wrapped module its own forward back."""
        if self.org_forward is not None:
            self.org_module.forward = self.org_forward
            self.org_forward = None

    # -- the math

    def rank_weights(self, batch_size: int, device, dtype) -> Optional[torch.Tensor]:
        """Per-sample rank mask m (timestep mask ⊙ rank dropout): None, or [B, R] / [1, R]."""
        mask = None
        if self.timestep_state is not None:
            mask = self.timestep_state.mask(self.rank, self.min_rank, device, dtype)
            if mask is not None and mask.shape[0] not in (1, batch_size):
                if batch_size % mask.shape[0] != 0:
                    raise ValueError(
                        f"{self.lora_name}: input batch {batch_size} is not a multiple of the "
                        f"{mask.shape[0]} timesteps the U-Net was called with"
                    )
                # classifier-free guidance stacks [uncond; cond] copies of the batch
                mask = mask.repeat(batch_size // mask.shape[0], 1)
        if self.rank_dropout is not None and self.training:
            keep = (torch.rand(batch_size, self.rank, device=device) > self.rank_dropout).to(dtype)
            keep = keep / (1.0 - self.rank_dropout)  # as sd-scripts: treat it as a smaller rank
            mask = keep if mask is None else mask * keep
        return mask

    def _down(self, x, weight):
        if self.is_conv:
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation)
        return F.linear(x, weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's change of the output for input x (without multiplier and alpha/R)."""
        lam = self.factor("lambda")
        mask = self.rank_weights(x.shape[0], x.device, (lam if lam is not None else self.factor("up")).dtype)
        coef = lam if mask is None else (mask if lam is None else lam[None, :] * mask)

        hidden = self._down(x, self.factor("down"))
        keep = None
        if self.dropout is not None and self.training:
            # one dropout mask for both branches, so the Ortho forms stay exactly zero-change
            keep = F.dropout(torch.ones_like(hidden), p=self.dropout)
            hidden = hidden * keep
        out = apply_up(hidden, self.factor("up"), coef)

        if self.spec.has_base:
            lam0 = self.factor("lambda_base")
            coef0 = lam0 if mask is None else lam0[None, :] * mask
            hidden0 = self._down(x, self.factor("down_base"))
            if keep is not None:
                hidden0 = hidden0 * keep
            out = out - apply_up(hidden0, self.factor("up_base"), coef0, frozen=True)
        return out

    def forward(self, x, *args, **kwargs):
        org_out = self.org_forward(x, *args, **kwargs)
        if not self.enabled or self.multiplier == 0:
            return org_out
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return org_out
        weight_dtype = self.factor("down").dtype
        lx = x
        if x.dtype != weight_dtype and not _autocast_enabled(x.device.type):
            lx = x.to(weight_dtype)  # e.g. a fp16 model with a fp32 network and no autocast
        change = (self.delta(lx) * (self.multiplier * self.scale)).to(org_out.dtype)
        if self.output_rows is not None:
            start, count = self.output_rows
            change = F.pad(change, (start, org_out.shape[-1] - start - count))
        return org_out + change

    def factors(self) -> LayerFactors:
        """This layer's current factors (detached) for weight-space computations."""
        def get(role):
            tensor = self.factor(role)
            return None if tensor is None else tensor.detach()

        return LayerFactors(self.lora_name, get("down"), get("up"), float(self.alpha.item()), lam=get("lambda"), down0=get("down_base"),
                            up0=get("up_base"), lam0=get("lambda_base"), masked=self.timestep_state is not None,
                            min_rank=self.min_rank)

    def delta_weight(self, rank_mask_vector: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The change in weight space (float32, shaped like the wrapped weight) with a fixed
        time-independent mask vector [R] (None = all ranks), without multiplier or alpha/R."""
        return self.factors().delta(rank_mask_vector, torch.float32, scaled=False)
