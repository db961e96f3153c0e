"""LoRASC, slow cascaded LoRA (arXiv 2407.01491): stages of a fast LoRA pair, each folded into W in
place, each started with NoisyTune noise on W.

    y = x W^T + b + s * (dropout(x) A^T) B^T          s = alpha / r (alpha / sqrt(r) with rsLoRA)
        W (d_out, d_in)   the layer's own weight: the pretrained W with every earlier stage folded in
                          and the noise of each stage that has trained (plain LoRA on it: no copy of W is kept)
        A (r, d_in), B (d_out, r)   the fast pair trained in stage k (the forward stays rank r)

Stage k starts, at its first training forward, with NoisyTune's perturbation of W, then trains a fresh pair:
    W <- W + (U - 1/2) * lambda * std(W)              U ~ U[0, 1)^(d_out x d_in), lambda = noise_intensity
At the end of each stage (by default every epoch: a fresh fast pair each epoch; or every
``cascade_interval`` optimizer steps, or at a call of ``cascade_step()``):
    W <- W + (1 - m) * s * B A                        slow-fast update, m = slow_momentum
    A <- kaiming-uniform(a=sqrt 5), B <- 0, their gradients and optimizer state dropped.
The rank of what the stages add grows with every stage, without limit, at no cost to the forward.
Dropout acts on the fast pair's input only: the folded stages are inside W and see the clean input.
ΔW = s B A (what ``merge`` adds to W: W already holds the stages).

Choices where the paper is silent (our reading):
- The slow-fast update is a Lookahead step with the slow weights in W: the slow model is W as the
  stage started, the fast one W + s B A, and slow <- m slow + (1 - m) fast adds (1 - m) s B A.
- NoisyTune's form on W: uniform noise scaled by the matrix's own std (unbiased, over all its
  entries, taken when the noise is added), intensity 0.15 as NoisyTune, on by default, at every stage
  including stage 0. The noise is kept (NoisyTune keeps it). U is drawn in float32 from
  ``torch.Generator().manual_seed(seed)`` on the CPU (the same values on every device and rank), seed
  (noise_seed * 1000003 + layer_index) * 1000003 + k, and scaled in float32 (float64 for a float64 W)
  before it is added in W's dtype.
- When the noise is added: when its stage starts training, i.e. at the layer's first forward in
  training mode (``module.train()``, adapter enabled, not merged; under ``torch.no_grad`` too, as
  reentrant activation checkpointing runs the training forward there) after the adapter is built, after a
  stage end, after ``next_task`` or ``restore_pretrained`` (``pending_start`` is True until then).
  Building or injecting an adapter leaves W untouched, a run that ends on a stage boundary (one stage
  per epoch) keeps no noise that nothing trained on, and ``next_task`` does not stack the next task's
  noise on an untrained one. A stage that ends before any training forward (two ``cascade_step()`` in a
  row) gets no noise: its std is recorded as 0. The training hooks add pending noise in a forward
  pre-hook of the model (run before FSDP2 gathers the weights, so every rank writes its own shard);
  without them the layer adds it at the start of its forward, except under FSDP2, where W is there a
  gathered copy that FSDP2 discards: the layer then raises a RuntimeError naming the hooks (or
  ``start_training()`` outside the forward). Under ``torch.compile`` that addition is one custom op
  (``fastlora::cascade_stage_noise``), so ``fullgraph=True`` holds.
- W is written in place (the paper merges each stage into the backbone). A W shared with another
  module (tied embeddings, one weight in two layers) would change there too: ``inject`` refuses such
  a layer, naming both owners (``inject(..., untie_shared_weights=True)`` gives it its own copy).
- A non-finite fast pair (a blown-up step) is never folded: ``cascade_step()`` raises
  ``NonFiniteStageError`` (a ValueError), and the training schedule's stage end is skipped with a
  RuntimeWarning naming the layer; W, the record, the pair and the stage counter stay as they were
  (the step counter goes on, the next stage end is tried one stage length later).
- What regenerates W, the record (host memory, in the state dict, so in adapter-only checkpoints):
  folded_A (K, r, d_in) and folded_B (K, d_out, r), the pair of each of the K folded stages as it
  was folded (K r (d_in + d_out) numbers, the pair's dtype), noise_seeds (K + 1,) int64 and
  noise_stds (K + 1,) float64, the seed and std of each stage's noise (std 0: no noise, or for the
  current stage, noise not added yet). ``cascades`` = K. The record grows by r (d_in + d_out)
  numbers per stage (no SVD recompression: not in the paper). Loading replays what W lacks, in order
  (noise 0, fold 0, noise 1, ..., noise K) with the recorded pairs and stds, in W's dtype on W's
  device: a model built from the pretrained weights gets the trained W bit for bit. The first noise
  replayed onto W (or onto the kept copy) must have been drawn with that W's std, to 1e-6 relative (a
  std computed on another device type may differ in its last bits), or for the same W in another
  precision (a bf16/fp16 W: to its eps; a wider W: its bf16 or fp16 rounding's std to 1e-6; the
  folded pairs are cast to the pair's dtype): a checkpoint trained on another base model of the same
  shapes is refused, naming both stds, and so is a recorded std whose noise
  bound intensity * std exceeds the largest value of W's dtype (it would write inf into W); both before
  anything changes. A W that already holds a prefix of the record gets only the rest (loading a
  checkpoint twice applies nothing twice); a W of another history is refused, unless the adapter
  keeps the pretrained copy: then W is restored from it and the whole record replayed. A whole-model
  state dict (``model.load_state_dict``, a Trainer resuming) holds the layer's W with its stages:
  that W is taken as it is, the record with it.
- Replay cost and its bound: each replayed stage draws a full d_out x d_in noise tensor on the CPU and
  adds a rank-r product, about 10-25 ns per weight element on one CPU core (measured: 256 stages of a
  512 x 512 layer load in 0.7 s, 16 stages of 2048 x 2048 in 0.8 s). A load that would replay more
  than ``MAX_REPLAY_STAGES`` (256) stages in one layer is refused before anything changes (a hostile
  record costs at most about 1 s per 512 x 512 layer, about a minute per 4096 x 4096 one); raise the
  module constant to load longer records, or save and load the model's weights (one read). Training
  warns once when a layer passes that many stages.
- Undo. The folded stages and the noise are the model (a merge the paper makes permanent): a
  disabled adapter turns off the current fast pair only (y = x W^T + b with the stages in W), and
  ``merge``/``unmerge`` concern the fast pair and restore W bit for bit. ``cascade_step`` and
  ``restore_pretrained`` refuse a merged layer. Replaying the record backwards would not be exact
  in floating point; instead, with keep_pretrained_copy (default off) the adapter keeps a CPU copy
  of W as it found it (one more W in host memory per layer and rank, never on the device, not
  saved), and ``restore_pretrained()`` copies it back bit for bit and starts the record again at
  stage 0 (its noise pending). After ``next_task`` W is the next task's starting point: a fresh
  adapter records (and copies) from there.
- Stage length: one epoch by default (cascade_interval "epoch"; the paper starts a fast pair every
  epoch): a stage ends every E optimizer steps, E the epoch's length in optimizer steps, as Trainer
  counts them (FastLoraCallback: ceil(batches per epoch / gradient_accumulation_steps); a dataloader
  without a length, an IterableDataset's, is refused: its epochs end where its data does) or as the
  loop gives them
  (``attach_training_hooks(..., steps_per_epoch=E)``); kept in the persistent buffer ``epoch_steps``,
  so a resumed run keeps its stages (the hooks refuse to attach with no known E). Or cascade_interval
  optimizer steps (an int), or stages_per_run=K: the run's N steps (Trainer's max_steps via
  FastLoraCallback, ``attach_training_hooks(..., total_steps=N)``; kept in the persistent buffer
  ``run_steps``) split into K stages, ending at steps ceil(j N / K), j < K (the hooks refuse to attach
  with no known length), or cascade_interval None: a stage ends only where the loop calls
  ``cascade_step()``. Checkpoints written before ``epoch_steps`` (or ``run_steps``) existed load
  with the layer's own value (0: unknown). Under FastLoraCallback a step a loss scaler skipped counts, as
  Trainer counts it (a stage due then ends); in a hand loop it is no step.
- Stages are counted within the run: its steps from 1 at the step counter's value when the run began
  (the persistent buffer ``run_start``; checkpoints written before it count from 0): a run begins where
  Trainer's ``train()`` starts without resuming (FastLoraCallback; a resumed one goes on with its
  checkpoint's run_start), and where ``attach_training_hooks(..., total_steps=N)`` finds the previous
  run over (all of its known length taken, or of unknown length). A second run on a trained adapter
  thus places its stages as the first run did.
- The run's final step ends no stage (when the run's length is known): a fold there would add only
  (1 - m) of the last fast pair and start a fresh pair (B = 0) right before evaluation. The last
  stage stays the fast pair, evaluated as W + s B A; ``next_task`` folds it, ``merge`` adds it. A
  run whose stage length (cascade_interval, or the epoch's) is not below its length (a one-epoch run
  by default) thus ends no stage: attaching the hooks warns (RuntimeWarning) that it trains plain
  LoRA on W with one stage's noise. With no known length (hand-written loop without total_steps)
  every multiple of the stage length ends a stage.
- Step counter and stage counter are persistent int64 buffers (optimizer_steps, cascades), so a
  checkpoint taken mid-stage resumes the schedule; whether the current stage's noise is in W is
  read from the record (noise_intensity > 0 and the last std 0: not yet).
- FSDP2: W and the pair may be sharded DTensors; a stage end gathers the pair and W's std (every
  rank calls it from the post-step hook), and each rank adds its shard of the fold and the noise.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from fastlora.kernels.caller_warnings import warn_at_caller

from ..config import CascadeLoraConfig
from ..distributed import copy_full_, full_view, local_part, local_view
from ..registry import register_method
from .base import Adapter, adapter_factory

_SEED_MIX = 1_000_003
_RECORD = ("folded_A", "folded_B", "noise_seeds", "noise_stds")
_STD_RTOL = 1e-6  # a stage-0 std computed on another device type may differ in its last bits
#: the most stages one layer's load may replay (each: a full-W noise draw and a rank-r product)
MAX_REPLAY_STAGES = 256
#: how a run gives "epoch" stages their length (or does without it)
EPOCH_LENGTH_WAYS = ("pass attach_training_hooks(model, optimizer, steps_per_epoch=N) with the epoch's optimizer "
                     "steps, train with FastLoraTrainer / FastLoraCallback (they take Trainer's steps per epoch), or "
                     "set CascadeLoraConfig(cascade_interval=<steps per stage>) or CascadeLoraConfig(stages_per_run=K)")
Record = tuple[Tensor, Tensor, Tensor, Tensor]


class NonFiniteStageError(ValueError):
    """A stage end found a non-finite fast pair: nothing was folded (W and the record are unchanged)."""


def weight_std(weight: Tensor) -> float:
    """std(W), unbiased over all its entries (gathered when sharded), in at least float32: what a stage's
    noise is scaled by."""
    return float(full_view(weight).to(torch.promote_types(weight.dtype, torch.float32)).std())


def seed_layer_index(seed: int, noise_seed: int) -> int:
    """The layer index whose stage-0 seed ``noise_seed_of(0)`` is ``seed``: (noise_seed * M + i) * M mod 2**63
    inverted (M odd, so invertible mod 2**63)."""
    return (seed * pow(_SEED_MIX, -1, 2**63) - noise_seed * _SEED_MIX) % 2**63


def _drawn_for(recorded: float, base: Tensor) -> bool:
    """Whether noise drawn with std ``recorded`` fits ``base`` (W, or its kept pretrained copy): std(base) to
    _STD_RTOL, or the same pretrained W in another precision: a half-precision base to its own precision
    (eps), a wider one rounded to bf16 or fp16 to _STD_RTOL (a checkpoint trained on the half copy)."""
    actual = weight_std(base)
    half = base.dtype in (torch.float16, torch.bfloat16)
    if abs(recorded - actual) <= (torch.finfo(base.dtype).eps if half else _STD_RTOL) * actual:
        return True
    return not half and any(abs(recorded - std) <= _STD_RTOL * std
                            for std in (weight_std(base.to(dtype)) for dtype in (torch.bfloat16, torch.float16)))


def backbone_noise(shape: torch.Size, std: float, intensity: float, seed: int, dtype: torch.dtype) -> Tensor:
    """NoisyTune's perturbation (U - 1/2) * intensity * std in ``dtype``, U ~ U[0, 1) drawn in float32
    from a CPU generator seeded with ``seed``."""
    uniform = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (uniform.to(dtype) - 0.5) * (intensity * std)


@torch.no_grad()
def add_noise_(weight: Tensor, seed: int, std: float, intensity: float) -> None:
    """W += (U - 1/2) * intensity * std, U from ``seed`` (nothing when std is 0); W plain or a sharded
    DTensor (each rank adds its shard)."""
    if std == 0:
        return
    dtype = torch.promote_types(weight.dtype, torch.float32)
    noise = backbone_noise(weight.shape, std, intensity, seed, dtype)
    local_view(weight).add_(local_part(noise.to(device=weight.device, dtype=weight.dtype), weight))


@torch.no_grad()
def add_stage_noise_(weight: Tensor, seed: int, intensity: float) -> float:
    """A stage's noise into W with W's current std (gathered when sharded); returns that std (0 when
    intensity is 0: nothing added)."""
    if not intensity:
        return 0.0
    std = weight_std(weight)
    add_noise_(weight, seed, std, intensity)
    return std


@torch.library.custom_op("fastlora::cascade_stage_noise", mutates_args=("weight", "std_out"))
def _stage_noise_op(weight: Tensor, std_out: Tensor, seed: Tensor, intensity: float) -> None:
    """``add_stage_noise_`` as one opaque op for torch.compile (a CPU generator cannot be traced):
    the seed comes from a CPU int64 tensor, the std goes into ``std_out`` (a CPU float64 tensor)."""
    std_out.fill_(add_stage_noise_(weight, int(seed), intensity))


@_stage_noise_op.register_fake
def _stage_noise_fake(weight: Tensor, std_out: Tensor, seed: Tensor, intensity: float) -> None:
    return None


class CascadeLoraAdapter(Adapter):
    """lora_A (r, d_in) kaiming-uniform(a=sqrt 5), lora_B (d_out, r) zeros; persistent int64 buffers
    optimizer_steps and cascades (counters), run_steps and epoch_steps (the run's and the epoch's
    length in optimizer steps, 0: unknown), run_start (optimizer_steps when the run began); the stage
    record (CPU tensors, in the state dict); ``pretrained``: the CPU copy of W with
    keep_pretrained_copy, else None; ``pending_start``: whether the current stage's noise still waits
    for the stage's first training forward. Building it leaves ``weight`` as it is; stages reach W
    through the layer it is bound to.
    """

    variable_length_keys = frozenset(_RECORD)
    #: earlier checkpoints lack them; they counted a run's steps from 0
    optional_state_keys = Adapter.optional_state_keys | {"run_steps", "epoch_steps", "run_start"}
    zero_when_missing = frozenset({"run_start"})
    #: the adapter writes its layer's W in place (inject refuses a W shared with another module)
    writes_weight = True

    def __init__(self, config: CascadeLoraConfig, in_features: int, out_features: int,
                 weight: Tensor, layer_index: int = 0) -> None:
        super().__init__(config, in_features, out_features, weight.device)
        factory = adapter_factory(weight)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, **factory))
        counter = {"dtype": torch.int64, "device": weight.device}
        self.register_buffer("optimizer_steps", torch.zeros((), **counter))
        self.register_buffer("cascades", torch.zeros((), **counter))
        self.register_buffer("run_steps", torch.zeros((), **counter))
        self.register_buffer("epoch_steps", torch.zeros((), **counter))
        self.register_buffer("run_start", torch.zeros((), **counter))
        self.scale = config.scale
        self.keep = 1.0 - float(config.slow_momentum)
        self.intensity = float(config.noise_intensity)
        self.layer_index = layer_index
        # the stage record is host memory whatever the ambient device (torch.device("meta") while building,
        # set_default_device): plain attributes, which module moves (to, to_empty) leave where they are
        cpu = torch.device("cpu")
        self.folded_A = torch.empty(0, config.r, in_features, dtype=factory["dtype"], device=cpu)
        self.folded_B = torch.empty(0, out_features, config.r, dtype=factory["dtype"], device=cpu)
        self.noise_seeds = torch.tensor([self.noise_seed_of(0)], dtype=torch.int64, device=cpu)
        # the stds of the folded stages, and the current stage's (0 until its noise is in W); the
        # current stage's seed and std live in fixed tensors the compiled noise op reads and writes
        self._stds_done = torch.empty(0, dtype=torch.float64, device=cpu)
        self._stage_std = torch.zeros(1, dtype=torch.float64, device=cpu)
        self._stage_seed = torch.tensor(self.noise_seed_of(0), dtype=torch.int64, device=cpu)
        self.pending_start = bool(self.intensity)
        if config.keep_pretrained_copy and weight.is_meta:
            raise ValueError("CascadeLoraConfig(keep_pretrained_copy=True) copies W's values when the layer is built, "
                             "and this W is on the meta device (no values): build the layer from a Linear that "
                             "holds its weights (AdapterLinear.from_linear, or inject into a loaded model)")
        self.pretrained: Optional[Tensor] = weight.detach().to("cpu", copy=True) if config.keep_pretrained_copy \
            else None
        self._tables: Optional[tuple[dict, dict]] = None
        self._weight_in_load = False
        # host copies of the counters: no device read per forward or step
        self._steps = 0
        self._cascades = 0
        self._run_steps = 0
        self._epoch_steps = 0
        self._run_start = 0
        self.reset_parameters()

    @property
    def noise_stds(self) -> Tensor:
        """(K + 1,) float64: the std of each stage's noise (0: none; the current stage's: 0 until added)."""
        return torch.cat([self._stds_done, self._stage_std])

    def bind(self, layer: nn.Module) -> None:
        """Keep the layer's parameter and buffer tables (not the layer: no reference cycle; a deepcopy
        of the layer carries them over): W is ``weight`` there, live under FSDP2's swaps, and the layer
        is merged while its ``weight_before_merge`` is set."""
        self._tables = (layer._parameters, layer._buffers)

    def _weight(self) -> Tensor:
        """The bound layer's W, refused while the layer is merged (W then holds the fast pair)."""
        if self._tables is None:
            raise RuntimeError("this LoRASC adapter is not bound to an AdapterLinear; it cannot reach W")
        parameters, buffers = self._tables
        if buffers.get("weight_before_merge") is not None:
            raise ValueError("the LoRASC layer is merged (W holds the fast pair); unmerge it first")
        return parameters["weight"]

    @torch.no_grad()
    def start_training(self, weight: Optional[Tensor] = None) -> None:
        """The current stage starts training: its noise into W (``weight``, the bound layer's W by
        default), its std recorded. Nothing when no noise is pending."""
        if not self.pending_start:
            return
        if torch.compiler.is_compiling():
            torch.ops.fastlora.cascade_stage_noise(weight, self._stage_std, self._stage_seed, self.intensity)
        else:
            weight = self._weight() if weight is None else weight
            self._stage_std.fill_(add_stage_noise_(weight, int(self._stage_seed), self.intensity))
        self.pending_start = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh fast pair: A kaiming-uniform(a=sqrt 5), B zeros, no gradients.

        A is drawn whole from the default generator on every rank (the same values as one process
        draws) and each rank keeps its shard when the pair is sharded (FSDP2).
        """
        new_a = nn.init.kaiming_uniform_(torch.empty(self.lora_A.shape, dtype=self.lora_A.dtype,
                                                     device=self.lora_A.device), a=math.sqrt(5))
        copy_full_(self.lora_A, new_a)
        copy_full_(self.lora_B, torch.zeros(self.lora_B.shape, dtype=self.lora_B.dtype, device=self.lora_B.device))
        self.lora_A.grad = None
        self.lora_B.grad = None

    def noise_seed_of(self, stage: int) -> int:
        """The seed of stage ``stage``'s noise in this layer."""
        return ((self.config.noise_seed * _SEED_MIX + self.layer_index) * _SEED_MIX + stage) % 2**63

    def _begin_stage(self, stage: int) -> None:
        """Record stage ``stage`` (its seed; std 0) with its noise pending."""
        seed = self.noise_seed_of(stage)
        self.noise_seeds = torch.cat([self.noise_seeds, torch.tensor([seed], dtype=torch.int64, device="cpu")])
        self._stage_seed.fill_(seed)
        self._stage_std.zero_()
        self.pending_start = bool(self.intensity)

    @torch.no_grad()
    def _fold(self, weight: Tensor, lora_a: Tensor, lora_b: Tensor) -> None:
        """W += (1 - slow_momentum) * s * B A (whole factors, on W's device), the product formed in at
        least fp32 and added in it: a bf16 W rounds once."""
        dtype = torch.promote_types(torch.promote_types(lora_a.dtype, lora_b.dtype), torch.float32)
        fast = lora_b.to(dtype) @ lora_a.to(dtype)
        local_view(weight).add_(local_part(fast * (self.keep * self.scale), weight))

    @torch.no_grad()
    def refresh_host_copies(self) -> None:
        """Host copies of the counters and lengths <- the buffers; the layer index <- the one the record's
        stage-0 seed was drawn with (a checkpoint of a later task's adapter continues its seeds)."""
        self._steps = int(self.optimizer_steps)
        self._cascades = int(self.cascades)
        self._run_steps = int(self.run_steps)
        self._epoch_steps = int(self.epoch_steps)
        self._run_start = int(self.run_start)
        if self.noise_seeds.numel():
            self.layer_index = seed_layer_index(int(self.noise_seeds[0]), self.config.noise_seed)

    @torch.no_grad()
    def set_run_steps(self, steps: int) -> None:
        """The run's length in optimizer steps (Trainer's max_steps, attach_training_hooks(total_steps=)),
        kept in the persistent buffer ``run_steps``: it places stages_per_run's stage ends and keeps
        the run's final step from ending a stage."""
        self.run_steps.fill_(steps)
        self._run_steps = int(steps)

    @torch.no_grad()
    def begin_run(self) -> None:
        """A run begins now: ``run_start`` <- optimizer_steps, from where its stages are counted."""
        self._run_start = self._steps
        self.run_start.fill_(self._run_start)

    @property
    def steps_in_run(self) -> int:
        """Optimizer steps taken in the current run."""
        return self._steps - self._run_start

    @property
    def run_over(self) -> bool:
        """Whether the current run, of known length, has taken all its steps."""
        return bool(self._run_steps) and self.steps_in_run >= self._run_steps

    @torch.no_grad()
    def set_epoch_steps(self, steps: int) -> None:
        """The epoch's length in optimizer steps (Trainer's steps per epoch,
        attach_training_hooks(steps_per_epoch=)), kept in the persistent buffer ``epoch_steps``: the stage
        length of cascade_interval "epoch"."""
        self.epoch_steps.fill_(steps)
        self._epoch_steps = int(steps)

    @property
    def scheduled(self) -> bool:
        """Whether the training hooks end stages (cascade_interval or stages_per_run set)."""
        return self.config.cascade_interval is not None or self.config.stages_per_run is not None

    @property
    def epoch_stages(self) -> bool:
        """Whether a stage is one epoch (cascade_interval "epoch")."""
        return self.config.cascade_interval == "epoch"

    @property
    def stage_steps(self) -> Optional[int]:
        """Optimizer steps per stage: cascade_interval, or for "epoch" the epoch's length (None while
        unknown); None with stages_per_run or loop-driven stages."""
        return (self._epoch_steps or None) if self.epoch_stages else self.config.cascade_interval

    def stage_ends_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based, of the step counter) ends a stage, t = step - run_start
        being its step in the run: never on the run's final step (when the run's length is known), with
        stages_per_run K at t = ceil(j N / K), j = 1 .. K - 1, of the N-step run, else at every multiple
        of ``stage_steps``. Raises ValueError for stages_per_run with no known run length, and for
        "epoch" stages with no known epoch length."""
        step -= self._run_start
        run, stages = self._run_steps, self.config.stages_per_run
        if stages is not None:
            if not run:
                raise ValueError("CascadeLoraConfig(stages_per_run=...) needs the run's length: train with "
                                 "FastLoraTrainer / FastLoraCallback (it takes Trainer's max_steps) or pass "
                                 "attach_training_hooks(model, optimizer, total_steps=N)")
            return step < run and step * stages // run > (step - 1) * stages // run
        interval = self.stage_steps
        if interval is None and self.epoch_stages:
            raise ValueError(f"CascadeLoraConfig(cascade_interval='epoch') needs the epoch's length: "
                             f"{EPOCH_LENGTH_WAYS}")
        return interval is not None and step % interval == 0 and step != run

    def op_arguments(self, weight: Tensor) -> dict[str, Any]:
        """The fast pair's arguments (plain LoRA on W, which holds the stages)."""
        return {"lora_a": self.lora_A, "lora_b": self.lora_B, "scale": self.scale}

    def describe(self) -> str:
        return f"LoRASC layer {self.layer_index} ({self.in_features} -> {self.out_features}), stage {self._cascades}"

    @torch.no_grad()
    def cascade_step(self) -> None:
        """End the stage: W += (1 - slow_momentum) * s * B A (recorded), then a fresh pair (gradients
        dropped) whose stage's noise waits for its first training forward. Refused while the layer is
        merged, and when the pair holds a non-finite value (W and the record are then unchanged)."""
        weight = self._weight()
        lora_a, lora_b = full_view(self.lora_A), full_view(self.lora_B)  # a sharded pair is gathered
        if not (bool(torch.isfinite(lora_a).all()) and bool(torch.isfinite(lora_b).all())):
            raise NonFiniteStageError(f"{self.describe()}: the fast pair holds non-finite values (NaN or inf: a "
                                      f"diverged step); it is not folded into W, and W and the stage record are "
                                      f"unchanged")
        self._fold(weight, lora_a, lora_b)
        self.folded_A = torch.cat([self.folded_A, lora_a.detach()[None].cpu()])
        self.folded_B = torch.cat([self.folded_B, lora_b.detach()[None].cpu()])
        self._stds_done = torch.cat([self._stds_done, self._stage_std])  # 0 when the stage never trained
        self._cascades += 1
        self.cascades.fill_(self._cascades)
        self.reset_parameters()
        self._begin_stage(self._cascades)
        if self._cascades == MAX_REPLAY_STAGES + 1:
            warn_at_caller(f"fastlora: {self.describe()}: more than MAX_REPLAY_STAGES = {MAX_REPLAY_STAGES} "
                           f"stages; loading an adapter-only checkpoint of it replays each one and is refused past "
                           f"that bound (raise fastlora.methods.cascade.MAX_REPLAY_STAGES, or save the model's "
                           f"weights)",
                           RuntimeWarning)

    @torch.no_grad()
    def after_optimizer_step(self, learning_rate: float) -> tuple[nn.Parameter, ...]:
        """Count the step; a step that ends a stage (``stage_ends_at``) runs ``cascade_step`` and
        returns the restarted pair (its optimizer state is dropped by the training hooks). A non-finite
        pair is not folded: the stage goes on, with a RuntimeWarning."""
        ends = self.stage_ends_at(self._steps + 1)
        self._steps += 1
        self.optimizer_steps.fill_(self._steps)
        if not ends:
            return ()
        try:
            self.cascade_step()
        except NonFiniteStageError as error:
            warn_at_caller(f"fastlora: {error}; the stage goes on", RuntimeWarning)
            return ()
        return (self.lora_A, self.lora_B)

    @torch.no_grad()
    def restore_pretrained(self) -> None:
        """W <- the copy kept at build time (keep_pretrained_copy), bit for bit; the record then holds
        no stage (cascades 0), and stage 0's noise is pending again. The fast pair and the step counter
        stay."""
        if self.pretrained is None:
            raise ValueError("this LoRASC adapter keeps no copy of the pretrained W; build it with "
                             "CascadeLoraConfig(keep_pretrained_copy=True)")
        weight = self._weight()
        copy_full_(weight, self.pretrained.to(weight.device))
        self.folded_A, self.folded_B = self.folded_A[:0], self.folded_B[:0]
        self.noise_seeds = self.noise_seeds[:0]
        self._stds_done = self._stds_done[:0]
        self._begin_stage(0)
        self._cascades = 0
        self.cascades.fill_(0)

    def _record_of(self, state: dict[str, Tensor]) -> Record:
        """The checkpoint's record, its shapes checked against this layer."""
        folded_a, folded_b, seeds, stds = (state[name] for name in _RECORD)
        count = folded_a.shape[0] if folded_a.dim() == 3 else -1
        r, d_in, d_out = self.config.r, self.in_features, self.out_features
        if (tuple(folded_a.shape) != (count, r, d_in) or tuple(folded_b.shape) != (count, d_out, r)
                or tuple(seeds.shape) != (count + 1,) or tuple(stds.shape) != (count + 1,)):
            raise ValueError(f"LoRASC record of shapes folded_A {tuple(folded_a.shape)}, folded_B "
                             f"{tuple(folded_b.shape)}, noise_seeds {tuple(seeds.shape)}, noise_stds "
                             f"{tuple(stds.shape)} is not (K, {r}, {d_in}), (K, {d_out}, {r}), (K + 1,), (K + 1,)")
        if "cascades" in state and int(state["cascades"]) != count:
            raise ValueError(f"LoRASC record holds {count} stages, its cascades counter {int(state['cascades'])}")
        if seeds.is_floating_point() or not stds.is_floating_point() or not bool(((stds >= 0) & stds.isfinite()).all()):
            raise ValueError("LoRASC record: noise_seeds must be integers and noise_stds finite floats >= 0")
        if not (bool(folded_a.isfinite().all()) and bool(folded_b.isfinite().all())):
            raise ValueError("LoRASC record: folded_A and folded_B must be finite (a stage end folds only a "
                             "finite pair)")
        dtype = self.folded_A.dtype  # the pair's (a checkpoint of a model in another dtype holds its own)
        return folded_a.to(dtype), folded_b.to(dtype), seeds.to(torch.int64), stds.to(torch.float64)

    def _held_stages(self, record: Record) -> Optional[int]:
        """How many of the record's stages W already holds (this adapter's record is its prefix; the
        current stage's noise may be pending here), or None when W holds another history that the
        kept pretrained copy can replace; raises otherwise, when the load would replay more than
        MAX_REPLAY_STAGES stages, and when its noise does not fit W (``_check_noise``)."""
        folded_a, folded_b, seeds, stds = record
        held, count = self.folded_A.shape[0], folded_a.shape[0]
        own = self.noise_stds
        close = lambda a, b: torch.allclose(a, b, rtol=_STD_RTOL, atol=0)  # noqa: E731
        # W holds nothing of this adapter's record (no stage folded, stage 0's noise not in W): any record
        # starts there, whatever layer index its seeds were drawn with (a later task's adapter, say)
        bare = held == 0 and (self.pending_start or not bool(own[0]))
        prefix = held <= count and (bare or torch.equal(seeds[:held + 1], self.noise_seeds)) \
            and close(stds[:held], own[:held]) and (self.pending_start or close(stds[held:held + 1], own[held:])) \
            and torch.equal(folded_a[:held].to(self.folded_A.dtype), self.folded_A) \
            and torch.equal(folded_b[:held].to(self.folded_B.dtype), self.folded_B)
        if not prefix and self.pretrained is None:
            raise ValueError(f"W holds {held} LoRASC stages (and their noise) that do not begin the checkpoint's "
                             f"{count}: load into a model built from the pretrained weights, or build the "
                             f"adapters with keep_pretrained_copy=True so that the load starts from that copy")
        replayed = count - held if prefix else count
        if replayed > MAX_REPLAY_STAGES:
            raise ValueError(f"LoRASC record: loading it replays {replayed} stages into this layer "
                             f"({self.out_features} x {self.in_features}), more than MAX_REPLAY_STAGES = "
                             f"{MAX_REPLAY_STAGES} (each stage costs a full-W noise draw and a rank-{self.config.r} "
                             f"product); raise fastlora.methods.cascade.MAX_REPLAY_STAGES to load it, or load "
                             f"the model's weights instead")
        if not prefix:
            self._check_noise(stds, 0, self.pretrained)
        else:
            self._check_noise(stds, held, self._weight() if self.pending_start else None)
        return held if prefix else None

    def _check_noise(self, stds: Tensor, start: int, base: Optional[Tensor]) -> None:
        """Refuse recorded noise stds that do not fit W: intensity * std above the largest value of W's
        dtype (the noise would write inf into W), or a first replayed noise, stage ``start``'s added to
        ``base`` (W, or the kept pretrained copy; None: W holds it already), whose std is not std(base)
        to _STD_RTOL (a checkpoint of another base model)."""
        if not self.intensity:
            return
        weight = self._weight()
        limit = torch.finfo(weight.dtype).max
        if bool((stds * self.intensity > limit).any()):
            raise ValueError(f"{self.describe()}: LoRASC record: noise_stds up to {float(stds.max()):.6g} at "
                             f"noise_intensity {self.intensity} would overflow W's {weight.dtype} (largest value "
                             f"{limit:.6g}) with inf")
        recorded = float(stds[start])
        if base is None or recorded == 0 or _drawn_for(recorded, base):
            return
        raise ValueError(f"{self.describe()}: LoRASC record: stage {start}'s noise was drawn with std(W) = "
                         f"{recorded:.9g}, but the W it would be added to has std {weight_std(base):.9g}: the "
                         f"checkpoint was trained on another base model (load it into the model it was trained from)")

    def note_load(self, with_weight: bool) -> None:
        """A state dict that holds W too (loaded into W just before) brings the stages in W: none is replayed."""
        self._weight_in_load = with_weight

    def check_state(self, state: dict[str, Tensor]) -> None:
        """Refuse a malformed record, or one W cannot reach (see ``_held_stages``)."""
        if all(name in state for name in _RECORD):
            self._held_stages(self._record_of(state))

    @torch.no_grad()
    def _replay(self, record: Record, replay: bool) -> None:
        """Bring W to what the record describes (replaying the stages it lacks; none when not
        ``replay``: W already holds them), then keep the record."""
        folded_a, folded_b, seeds, stds = record
        count = folded_a.shape[0]
        if replay:
            held = self._held_stages(record)
            weight = self._weight()
            noisy = not self.pending_start  # W holds the noise of stage ``held``
            if held is None:
                copy_full_(weight, self.pretrained.to(weight.device))
                held, noisy = 0, False
            for stage in range(held, count + 1):
                if stage > held or not noisy:
                    add_noise_(weight, int(seeds[stage]), float(stds[stage]), self.intensity)
                if stage < count:
                    self._fold(weight, folded_a[stage].to(weight.device), folded_b[stage].to(weight.device))
        self.folded_A, self.folded_B = folded_a.detach().cpu().clone(), folded_b.detach().cpu().clone()
        self.noise_seeds = seeds.cpu().clone()
        self._stds_done = stds[:-1].cpu().clone()
        self._stage_std.copy_(stds[-1:])
        self._stage_seed.fill_(int(seeds[-1]))
        self.pending_start = bool(self.intensity) and float(stds[-1]) == 0.0

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _RECORD:
            destination[prefix + name] = getattr(self, name)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        keys = [prefix + name for name in _RECORD]
        if all(key in state_dict for key in keys):
            counter = state_dict.get(prefix + "cascades")
            state = {name: state_dict[key] for name, key in zip(_RECORD, keys)}
            record = self._record_of(state if counter is None else {**state, "cascades": counter})
            self._replay(record, replay=not self._weight_in_load)
        elif strict:
            missing_keys.extend(key for key in keys if key not in state_dict)
        self._weight_in_load = False
        rest = {key: value for key, value in state_dict.items() if key not in keys}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_stats(self) -> dict[str, float]:
        return {"cascades": float(self._cascades), "optimizer_steps": float(self._steps)}


register_method(CascadeLoraConfig, CascadeLoraAdapter)
