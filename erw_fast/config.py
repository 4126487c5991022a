"""Typed run configuration: YAML files validated against dataclasses, with ``key.sub=value`` overrides.

Unknown or misspelled keys and wrongly typed values are errors that name the key (with a suggestion);
cross-field checks (warmup ≥ total steps, alignment depth beyond the model, …) run in ``validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key it concerns."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    # erw: ERW's warmup, then diffusion + decaying λ·alignment; repa: diffusion + constant λ·alignment; sit: plain
    # diffusion; reg: REPA + REG's class token; erw_reg: ERW with REG's class token in Phase 2 (see `reg`).
    mode: Literal["erw", "repa", "sit", "reg", "erw_reg"] = "erw"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    @property
    def warmup(self) -> bool:
        """The run starts with ERW's warmup (Phase 1)."""
        return self.mode in ("erw", "erw_reg")

    @property
    def class_token(self) -> bool:
        """The diffusion phase's SiT takes the teacher's CLS token as a class token (REG)."""
        return self.mode in ("reg", "erw_reg")


@dataclass
class ModelConfig:
    name: str = "SiT-XL/2"
    input_size: int = 32  # latent side: 32 for 256 px with the SD VAE
    in_channels: int = 4
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    projector_dim: int = 2048
    qk_norm: bool = False
    use_rope: bool = False
    attn_backend: str = "auto"  # auto (sdpa) | sdpa | sdpa_flash | sdpa_efficient | sdpa_cudnn | math | flash_attn |
    # xformers | measure (time them at this run's shape and take the fastest correct one)
    # Architecture overrides for custom sizes (depth, hidden_size, num_heads, patch_size, mlp_ratio).
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float = 4.0

    def sit_kwargs(self, z_dims: list[int] | tuple[int, ...] = (), attn_backend: str | None = None,
                   alignment: AlignmentConfig | None = None) -> dict[str, Any]:
        """The SiT constructor's arguments: the named size, the overrides set here, one projector per z_dim, of
        the type ``alignment`` names (alignment.projector, .projector_kernel_size; REPA's MLP without it)."""
        from erw_fast.models.sit import sit_config

        named = ("depth", "hidden_size", "num_heads", "patch_size")
        overrides = {k: getattr(self, k) for k in named if getattr(self, k)}
        a = alignment or AlignmentConfig()
        return sit_config(
            self.name, input_size=self.input_size, in_channels=self.in_channels, num_classes=self.num_classes,
            class_dropout_prob=self.class_dropout_prob, projector_dim=self.projector_dim, qk_norm=self.qk_norm,
            use_rope=self.use_rope, attn_backend=attn_backend or self.attn_backend, mlp_ratio=self.mlp_ratio,
            z_dims=list(z_dims), projector=a.projector, projector_kernel_size=a.projector_kernel_size, **overrides,
        )

    def num_tokens(self) -> int:
        """Patch tokens per latent: (input_size / patch_size)²."""
        patch = self.sit_kwargs()["patch_size"]
        return (self.input_size // patch) ** 2


@dataclass
class EncoderConfig:
    names: list[str] = field(default_factory=lambda: ["dinov2-vit-b"])
    pretrained: bool = True
    weights_paths: list[str] = field(default_factory=list)  # one local file per encoder, or empty
    resolution: int = 256  # image resolution the encoder sees (before its own resize)
    # The frozen teacher's weights: fp32 as the reference (under the run's autocast), or bf16 (half the memory and
    # weight traffic; the forward is in bf16 either way under bf16 autocast).
    dtype: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # regional torch.compile of the teacher's blocks (train.compile_mode/_backend)
    # A TorchScript archive given as weights runs its own code when loaded: read one only when its sha256 is a
    # known release (OpenAI's CLIP files) or when this says the file is trusted.
    trust_torchscript: bool = False


@dataclass
class AlignmentConfig:
    objective: Literal["cosine", "nt_xent"] = "cosine"
    # NT-Xent only. No released code defines these (the ERW paper names NT-Xent, nothing more): this project's
    # choices. negatives: every token of every image (batch) or the same token position (position); scope: the
    # candidates are the whole global batch's teacher tokens (global: the same loss on any world size and
    # accumulation) or this micro-batch's only (local).
    temperature: float = 0.1
    negatives: Literal["batch", "position"] = "batch"
    negatives_scope: Literal["global", "local"] = "global"
    symmetric: bool = False
    backend: Literal["auto", "torch", "triton"] = "auto"
    encoder_depth: int = 8  # block (from 1) whose output the projector reads in the full phase / REPA
    weight: float = 0.5  # REPA's constant λ
    # The projector: REPA's MLP, or iREPA's Conv2d on the token grid ('same' padding; iREPA's LDM command trains
    # kernel 1, its paper says 3).
    projector: Literal["mlp", "conv"] = "mlp"
    projector_kernel_size: int = 1
    # The teacher's patch tokens as target: as they are, or iREPA's (f − α·mean_T f) / (std_T f + 1e-6) over the
    # tokens (unbiased std), online and precomputed features alike.
    target_norm: Literal["none", "spatial_zscore"] = "none"
    zscore_alpha: float = 0.6  # iREPA's LDM default
    # U-REPA's manifold loss: w · ‖cos-Gram(teacher tokens) − cos-Gram(projected tokens)‖²_F per image, added to
    # the alignment term (so it follows the alignment weight). 0: off.
    manifold_weight: float = 0.0
    # λ over the steps of the diffusion phase: auto (erw in ERW's Phase 2, constant otherwise) | constant | erw |
    # hard_stop (constant until stop_step, HASTE) | cosine (to 0 at stop_step). A stop_step with constant / erw
    # stops them there (a global step: the step with stop_step completed steps is the first unaligned one). Once
    # every alignment weight is 0 for good, the teacher, projector, attention capture and image decode stop
    # running (the run goes on in the phase "denoise"; not with REG, whose class token is the teacher's CLS).
    schedule: Literal["auto", "constant", "erw", "hard_stop", "cosine"] = "auto"
    stop_step: int | None = None


@dataclass
class HasteConfig:
    """HASTE's attention distillation (attn_weight > 0 turns it on; it needs the online teacher): a soft
    cross-entropy between the teacher's attention probabilities (CLS row/column removed) and the student's, per
    (student block, teacher block) pair, averaged over the pairs."""

    attn_weight: float = 0.0  # HASTE's --attn-coeff (0.5 in its run); 0: off
    student_blocks: list[int] = field(default_factory=lambda: [5, 6, 7, 8])  # SiT blocks, from 1
    teacher_blocks: list[int] = field(default_factory=lambda: [9, 10, 11, 12])  # paired in order, from 1
    # Student heads paired with the teacher's heads 0, 1, … in order (None: the student's first H_teacher heads).
    student_heads: list[int] | None = None
    schedule: Literal["constant", "hard_stop", "cosine"] = "hard_stop"
    stop_step: int | None = None  # HASTE's --early-stop-point (250000 for SiT-XL/2)
    # The student side is log_softmax, in fp32: it gives the reference's log(softmax(·)) loss on its golden step bit
    # for bit (gradients within 2e-7 relative) without its −inf/NaN once a probability underflows; so no switch.


@dataclass
class ERWConfig:
    warmup_steps: int = 100_000
    warmup_depth: int = 4  # L: blocks built and trained in Phase 1
    c0: float | None = None  # None → preset by model size (XL 6, L 3, else 1)
    half_life: float = 50_000
    reuse_projector: bool = True  # Phase 2 starts from the Phase-1 projector
    legacy_warmup_loss: bool = False  # reproduce the reference's last-sample-only warmup loss
    # What the warmup back-propagates: weight · alignment loss (the reference's --proj-coeff, 0.5); the raw
    # alignment loss is logged as loss_align either way.
    warmup_loss_weight: float = 0.5
    warmup_rope: bool = False  # the reference never uses RoPE in the warmup model (model.use_rope: Phase 2)


@dataclass
class RegConfig:
    """REG (run.mode reg / erw_reg): the first encoder's CLS token, noised with the latent's t, enters the SiT as
    token 0; its velocity is predicted from token 0 and the alignment target is [CLS, patch tokens]."""

    cls_weight: float = 0.03  # REG's --cls: weight of the class token's velocity loss
    # erw_reg only, this project's extension (in neither ERW's nor REG's code): ERW's warmup on the class-token
    # model (clean latents and the clean CLS at t = 0, alignment over 1 + N tokens), its class-token embedder
    # carried into Phase 2. false: the released ERW warmup; Phase 2's class-token embedder starts fresh.
    warmup_class_token: bool = False


@dataclass
class DiffusionConfig:
    path_type: Literal["linear", "cosine"] = "linear"
    time_weighting: Literal["uniform", "lognormal"] = "uniform"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    implementation: Literal["auto", "fused", "foreach"] = "auto"
    ema_decay: float = 0.9999


@dataclass
class TrainConfig:
    total_steps: int = 400_000
    global_batch_size: int = 256
    micro_batch_size: int | None = None  # per device; None → global / world size (no accumulation)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    tf32: bool = True
    max_nonfinite_steps: int = 10  # abort after this many non-finite steps in a row
    # Stop (with a checkpoint) after this many steps in one invocation; rerunning resumes. For time-limited
    # cluster jobs.
    max_steps_per_run: int | None = None
    compile: bool = False
    compile_scope: Literal["model", "blocks"] = "blocks"  # blocks: regional compilation of each SiT block
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_backend: str = "inductor"  # e.g. aot_eager to debug a compile problem without codegen


@dataclass
class DataConfig:
    # demo: the procedural in-memory set; webdataset / dali: shards written by `erw-prepare` (same samples).
    kind: Literal["demo", "webdataset", "dali"] = "demo"
    path: str | None = None  # the prepared dataset directory (holding manifest.json)
    image_size: int = 256  # image side the encoder sees (64 for the demo)
    num_samples: int = 2048  # demo dataset size
    # DataLoader workers / DALI python workers; None: min(4, this rank's share of the usable cores), resolved at
    # start-up and said in the `data:` log line (more workers than cores only oversubscribe the CPUs).
    num_workers: int | None = None
    # webdataset only: threads of the training process assemble batches instead (set num_workers: 0). No batch
    # crosses a process boundary: the cheapest mode per CPU core for raw-image or latents-only shards.
    loader_threads: int = 0
    prefetch: int = 2  # batches queued per worker / DALI queue depth
    pin_memory: bool | None = None  # None: when training on CUDA
    # Stage the next step's batch (copies to the GPU, latent sampling) on a side CUDA stream during the current
    # step, so the compute stream never waits for them. None: when training on CUDA.
    device_prefetch: bool | None = None
    flip: bool = False  # random horizontal flips (needs shards prepared with flipped moments)
    on_error: Literal["raise", "skip"] = "raise"  # an unreadable sample stops the run, or is replaced and counted
    verify: Literal["none", "size", "checksum"] = "size"  # shard check when the loader starts
    latent_scale: float | None = None  # expected VAE scaling factor (None: the manifest's)
    features: bool = False  # use precomputed teacher features stored in the shards instead of the encoder
    dali_threads: int = 2
    dali_decoder: Literal["auto", "mixed", "cpu"] = "auto"


@dataclass
class LoggingConfig:
    log_every: int = 10
    # A tqdm bar on stderr when stdout and stderr are terminals; otherwise (a SLURM log file, a pipe) or when false,
    # one plain line per logging step on stdout: step/total, phase, loss parts, λ, img/s, ETA.
    progress: bool = True
    tensorboard: bool = False  # <run_dir>/tb; needs the tb extra
    wandb: bool = False  # needs the wandb extra; the run id is kept in <run_dir>/wandb_id so a resume continues it
    wandb_project: str = "erw_fast"
    plot: bool = True
    # In-training monitors of the full model's EMA (0 = off): a sample grid PNG from fixed labels and noise,
    # and the per-layer CKNNA with the teacher on a fixed held-out batch.
    sample_every: int = 0
    sample_count: int = 16
    sample_steps: int = 50
    # A second grid from the same noise with classifier-free guidance at this scale (REPA's training-time grids:
    # 4.0 over the whole time range); 1.0: the unguided grid only.
    sample_cfg_scale: float = 4.0
    sample_vae: str = "auto"  # auto (toy for the demo data, else the SD VAE "ema") | toy | ema | mse | local path
    cknna_every: int = 0
    cknna_samples: int = 64
    cknna_t: float = 0.0
    # Small-N FID of EMA samples against the same number of training images (a trend, not a paper number).
    fid_every: int = 0
    fid_samples: int = 256
    fid_inception: str | None = None  # TF-ported FID Inception weights (None: the torch hub cache)


@dataclass
class CheckpointConfig:
    every: int = 10_000
    keep_last: int = 3
    export_reference: bool = True  # also write the reference layout {model, ema, args, steps} at the end
    resume: str = "auto"  # auto (latest in the run dir) | none | path to a checkpoint
    init_from_reference: str | None = None  # a reference checkpoint to start from (a warmup one → Phase 1)
    # A rerun of a finished run says it is complete and rewrites nothing; true: it writes the export again (a
    # missing export is always written). The final checkpoint is never rewritten.
    reexport: bool = False
    # On these signals (a scheduler's time limit or preemption) save at the next step boundary and exit with
    # 128 + the signal number; [] leaves the default (the process dies, work since the last checkpoint is lost).
    stop_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP"]] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"]
    )


@dataclass
class EngineConfig:
    # auto: DeepSpeed under the `deepspeed` launcher or with --deepspeed_config, otherwise DDP (torchrun) or a
    # single process. The choice and its reason are printed at start.
    kind: Literal["auto", "ddp", "deepspeed"] = "auto"
    # DeepSpeed ZeRO stage; None → the stage in the DeepSpeed JSON, else 1 (README: why ZeRO-1 on one node).
    zero_stage: int | None = None
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged into the generated one (conflicts are errors)
    # DDP
    ddp_bucket_mb: float = 25.0
    ddp_static_graph: bool = False
    ddp_gradient_as_bucket_view: bool = True
    # Each rank keeps the EMA of only its share of the tensors (assembled for checkpoints/export/monitors).
    ddp_shard_ema: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    erw: ERWConfig = field(default_factory=ERWConfig)
    reg: RegConfig = field(default_factory=RegConfig)
    haste: HasteConfig = field(default_factory=HasteConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def class_token_in(self, phase: str) -> bool:
        """Whether this run's SiT has REG's class token in the phase named ``phase`` (its warmup only with
        reg.warmup_class_token)."""
        return self.run.class_token and (phase != "warmup" or self.reg.warmup_class_token)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ------------------------------------------------------------------------------------------ parsing


def _suggest(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f" — did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{_suggest(str(value), map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {annotation!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            suggestion = _suggest(key, names)
            if suggestion:
                suggestion = f" — did you mean {prefix + difflib.get_close_matches(key, names, n=1, cutoff=0.6)[0]!r}?"
            raise ConfigError(f"unknown config key {where!r}{suggestion}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value or {}, f"{where}.")
        else:
            kwargs[key] = _coerce(value, annotation, where)
    return cls(**kwargs)


def flatten_dotted(tree: dict[str, Any], prefix: str = "", empty_as_leaf: bool = False) -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: nested mappings as dotted keys (an empty mapping is dropped, or kept as a
    value with ``empty_as_leaf``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and (value or not empty_as_leaf):
            flat.update(flatten_dotted(value, f"{prefix}{key}.", empty_as_leaf))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: typing.Sequence[str]) -> dict[str, Any]:
    """['train.total_steps=100', 'encoder.names=[a,b]'] → nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML file (optional), apply overrides, build and validate the typed config."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides))
    config = _build(Config, data, "")
    validate(config)
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    config = _build(Config, data, "")
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks, each naming the keys involved."""
    from erw_fast.kernels._utils import check_temperature
    from erw_fast.models.sit import SIT_SIZES, parse_model_name

    try:
        size, patch = parse_model_name(config.model.name)
    except ValueError as error:
        raise ConfigError(f"model.name: {error}") from error
    depth = config.model.depth or SIT_SIZES[size].depth
    train, erw, align = config.train, config.erw, config.alignment
    if train.total_steps < 1:
        raise ConfigError(f"train.total_steps must be ≥ 1, got {train.total_steps}")
    if train.global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size must be ≥ 1, got {train.global_batch_size}")
    if config.run.warmup:
        if not 0 < erw.warmup_steps < train.total_steps:
            raise ConfigError(
                f"erw.warmup_steps ({erw.warmup_steps}) must be > 0 and < train.total_steps ({train.total_steps})"
            )
        if not 1 <= erw.warmup_depth <= depth:
            raise ConfigError(f"erw.warmup_depth ({erw.warmup_depth}) must be in [1, model depth {depth}]")
        if not erw.warmup_loss_weight > 0:
            raise ConfigError(f"erw.warmup_loss_weight must be > 0, got {erw.warmup_loss_weight}")
    if config.run.mode != "sit":
        if not 1 <= align.encoder_depth <= depth:
            raise ConfigError(
                f"alignment.encoder_depth ({align.encoder_depth}) is beyond the model: {config.model.name} has "
                f"depth {depth}"
            )
        if not config.encoder.names:
            raise ConfigError(f"encoder.names is empty, but mode {config.run.mode!r} aligns with an encoder")
        if align.objective == "nt_xent" and align.symmetric and align.negatives_scope == "global":
            raise ConfigError("alignment.symmetric: the symmetric NT-Xent takes the local batch's keys "
                              "(set alignment.negatives_scope=local)")
        if config.encoder.weights_paths and len(config.encoder.weights_paths) != len(config.encoder.names):
            raise ConfigError(
                f"encoder.weights_paths has {len(config.encoder.weights_paths)} entries for "
                f"{len(config.encoder.names)} encoders"
            )
    _check_reg(config)
    _check_alignment_family(config)
    _check_haste(config, depth)
    _check_schedule(config)
    try:
        check_temperature(align.temperature)
    except ValueError as error:
        raise ConfigError(f"alignment.{error}") from None
    if len(config.optim.betas) != 2:
        raise ConfigError(f"optim.betas needs two values, got {config.optim.betas}")
    if not 0 <= config.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {config.optim.ema_decay}")
    if config.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be ≥ 1, got {config.checkpoint.keep_last}")
    if config.engine.zero_stage is not None and config.engine.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage must be 0, 1, 2 or 3, got {config.engine.zero_stage}")
    if not config.engine.ddp_bucket_mb > 0:
        raise ConfigError(f"engine.ddp_bucket_mb must be > 0, got {config.engine.ddp_bucket_mb}")
    if config.model.input_size % (config.model.patch_size or patch):
        raise ConfigError(
            f"model.input_size ({config.model.input_size}) is not divisible by the patch size "
            f"{config.model.patch_size or patch}"
        )
    _check_ranges(config)


def _check_alignment_family(config: Config) -> None:
    """iREPA's projector and target normalisation, U-REPA's manifold weight."""
    a = config.alignment
    k = a.projector_kernel_size
    if k < 1 or k % 2 == 0:
        raise ConfigError(f"alignment.projector_kernel_size must be an odd integer ≥ 1 (1 or 3 in iREPA), got {k}")
    if a.manifold_weight and config.run.warmup and config.erw.legacy_warmup_loss:
        raise ConfigError("alignment.manifold_weight: erw.legacy_warmup_loss reproduces the released ERW warmup loss, "
                          "which has no manifold term (set one of them off)")
    if a.projector == "conv" and config.run.class_token:
        raise ConfigError(f"alignment.projector: 'conv' needs a square token grid and run.mode={config.run.mode} puts "
                          "REG's class token in front (use alignment.projector=mlp)")


def _check_schedule(config: Config) -> None:
    """alignment.schedule / stop_step: a stop inside the diffusion phase, the kinds that need one given it, ERW's
    decay only where ERW runs, nothing to schedule without alignment."""
    a, mode = config.alignment, config.run.mode
    if mode == "sit":
        if a.schedule != "auto" or a.stop_step is not None:
            what = f"schedule={a.schedule}" if a.schedule != "auto" else f"stop_step={a.stop_step}"
            raise ConfigError(f"alignment.{what}: run.mode=sit has no alignment to schedule")
        return
    if a.schedule == "erw" and not config.run.warmup:
        raise ConfigError(f"alignment.schedule=erw: ERW's decay needs ERW's phases (run.mode erw / erw_reg), "
                          f"run.mode is {mode!r}")
    if a.schedule in ("hard_stop", "cosine") and a.stop_step is None:
        raise ConfigError(f"alignment.stop_step: the {a.schedule} schedule needs its stop step (got none)")
    if a.stop_step is not None:
        start = config.erw.warmup_steps if config.run.warmup else 0
        if not start < a.stop_step <= config.train.total_steps:
            where = f"ERW's Phase 2 begins at erw.warmup_steps={start}" if config.run.warmup else "the run begins at 0"
            raise ConfigError(f"alignment.stop_step={a.stop_step}: must be inside the diffusion phase, > its first "
                              f"step ({where}) and ≤ train.total_steps={config.train.total_steps}")


def _check_reg(config: Config) -> None:
    from erw_fast.encoders.registry import get_encoder_spec, parse_encoder_names

    mode = config.run.mode
    if config.reg.warmup_class_token and mode != "erw_reg":
        raise ConfigError(f"reg.warmup_class_token: only run.mode=erw_reg has a warmup with a class token "
                          f"(run.mode is {mode!r})")
    if not config.run.class_token:
        return
    try:
        first = parse_encoder_names(config.encoder.names)[0]
        spec = get_encoder_spec(first)
    except (ValueError, IndexError):
        return  # an unknown or missing encoder name is reported where the encoders are checked
    if not spec.class_token:
        raise ConfigError(f"encoder.names: run.mode={mode} takes the first encoder's CLS token, and {spec.name} "
                          "has none (put an encoder with a class token, e.g. dinov2-vit-b, first)")


def _check_haste(config: Config, depth: int) -> None:
    """HASTE's keys against the run: it needs the online teacher, blocks and heads both models have, equal token
    grids, and a stop step where its schedule needs one."""
    from erw_fast.encoders.registry import get_encoder_spec, parse_encoder_names
    from erw_fast.models.sit import SIT_SIZES, parse_model_name

    h, mode = config.haste, config.run.mode
    if not h.attn_weight > 0:
        return
    if mode == "sit":
        raise ConfigError("haste.attn_weight: HASTE distils the teacher's attention, and run.mode=sit has no teacher")
    if config.data.features:
        raise ConfigError("haste.attn_weight: HASTE needs the online teacher's attention maps, which precomputed "
                          "features (data.features=true) do not hold; set data.features=false")
    a = config.alignment
    if a.objective == "nt_xent" and a.negatives_scope == "global":
        raise ConfigError("haste.attn_weight: HASTE takes the teacher's maps per micro-batch, not NT-Xent's "
                          "global keys; set alignment.negatives_scope=local")
    start = config.erw.warmup_steps if config.run.warmup else 0
    if h.stop_step is None and h.schedule in ("hard_stop", "cosine"):
        raise ConfigError(f"haste.stop_step: haste.schedule={h.schedule} needs it (HASTE stops at 250000 for "
                          "SiT-XL/2)")
    if h.stop_step is not None and h.stop_step <= start:
        raise ConfigError(f"haste.stop_step: {h.stop_step} is not after the start of the diffusion phase (step "
                          f"{start}), so the attention term would never run")
    if len(h.student_blocks) != len(h.teacher_blocks) or not h.student_blocks:
        raise ConfigError(f"haste.student_blocks {h.student_blocks} and haste.teacher_blocks {h.teacher_blocks} "
                          "must pair up one to one")
    if not all(1 <= b <= depth for b in h.student_blocks):
        raise ConfigError(f"haste.student_blocks: {h.student_blocks} must be in [1, model depth {depth}]")
    try:
        spec = get_encoder_spec(parse_encoder_names(config.encoder.names)[0])
        teacher_tokens = spec.num_patches(config.encoder.resolution)
    except (ValueError, IndexError):
        return  # an unknown encoder or resolution is reported where the encoders are checked
    if not all(1 <= b <= spec.depth for b in h.teacher_blocks):
        raise ConfigError(f"haste.teacher_blocks: {h.teacher_blocks} must be in [1, {spec.name}'s depth "
                          f"{spec.depth}]")
    size, patch = parse_model_name(config.model.name)
    heads = config.model.num_heads or SIT_SIZES[size].num_heads
    student = h.student_heads if h.student_heads is not None else list(range(spec.num_heads))
    if len(set(student)) != len(student) or not 0 < len(student) <= spec.num_heads:
        raise ConfigError(f"haste.student_heads: {h.student_heads} must be distinct, one per teacher head "
                          f"0, 1, … (at most {spec.num_heads}, {spec.name}'s heads)")
    if not all(0 <= x < heads for x in student):
        raise ConfigError(f"haste.student_heads: {h.student_heads} must be student heads in [0, {heads})"
                          + ("" if h.student_heads is not None else
                             f" (unset: the first {spec.num_heads}, one per teacher head)"))
    grid = config.model.input_size // (config.model.patch_size or patch)
    if grid * grid != teacher_tokens:
        raise ConfigError(f"haste.attn_weight: the student's {grid}×{grid} patch grid and {spec.name}'s "
                          f"{teacher_tokens} patch tokens differ; the attention maps must have the same size")


# Numeric ranges: (dotted key, whether a value is allowed, the rule, what the key means). None (an optional left
# unset) always passes. Without these, 0 or a negative value failed only later: a ZeroDivisionError after step 1
# (checkpoint.every, logging.log_every), an abort of a healthy run (train.max_nonfinite_steps), or was accepted.
_RANGES: tuple[tuple[str, typing.Callable[[Any], bool], str, str], ...] = (
    ("checkpoint.every", lambda v: v >= 1, "≥ 1", "steps between checkpoints"),
    ("logging.log_every", lambda v: v >= 1, "≥ 1", "steps between logged records"),
    ("train.max_nonfinite_steps", lambda v: v >= 1, "≥ 1", "non-finite steps in a row that stop the run"),
    ("train.max_steps_per_run", lambda v: v >= 1, "≥ 1", "steps per invocation; leave unset for no limit"),
    ("train.micro_batch_size", lambda v: v >= 1, "≥ 1", "samples per micro-batch; leave unset for no accumulation"),
    ("run.seed", lambda v: v >= 0, "≥ 0", "the run's seed"),
    ("encoder.resolution", lambda v: v >= 1, "≥ 1", "the image side the encoder sees"),
    ("model.class_dropout_prob", lambda v: 0 <= v <= 1, "in [0, 1]", "the label-dropout probability"),
    ("erw.half_life", lambda v: v > 0, "> 0", "steps over which λ halves"),
    ("erw.c0", lambda v: v >= 0, "≥ 0", "λ's starting value; leave unset for the preset"),
    ("alignment.weight", lambda v: v >= 0, "≥ 0", "REPA's λ"),
    ("alignment.zscore_alpha", lambda v: 0 <= v <= 1, "in [0, 1]", "the share of the mean iREPA's z-score removes"),
    ("alignment.manifold_weight", lambda v: v >= 0, "≥ 0", "U-REPA's manifold-loss weight; 0 is off"),
    ("reg.cls_weight", lambda v: v >= 0, "≥ 0", "the weight of REG's class-token loss"),
    ("haste.attn_weight", lambda v: v >= 0, "≥ 0", "the weight of HASTE's attention distillation"),
    ("haste.stop_step", lambda v: v >= 1, "≥ 1", "the step from which HASTE's terms are off"),
    ("optim.lr", lambda v: v >= 0, "≥ 0", "the learning rate"),
    ("optim.weight_decay", lambda v: v >= 0, "≥ 0", "AdamW's weight decay"),
    ("optim.eps", lambda v: v > 0, "> 0", "AdamW's epsilon"),
    ("optim.grad_clip", lambda v: v >= 0, "≥ 0", "the clipping norm; 0 disables clipping"),
    ("optim.betas", lambda v: all(0 <= b < 1 for b in v), "two values in [0, 1)", "AdamW's betas"),
    ("data.num_samples", lambda v: v >= 1, "≥ 1", "the demo dataset's size"),
    ("data.image_size", lambda v: v >= 1, "≥ 1", "the image side"),
    ("data.num_workers", lambda v: v >= 0, "≥ 0", "loader worker processes; 0 reads in the training process"),
    ("data.loader_threads", lambda v: v >= 0, "≥ 0", "loader threads; 0 for none"),
    ("data.prefetch", lambda v: v >= 1, "≥ 1", "batches queued per worker"),
    ("data.dali_threads", lambda v: v >= 1, "≥ 1", "DALI's CPU threads"),
    ("data.latent_scale", lambda v: v > 0, "> 0", "the VAE scaling factor; leave unset for the manifest's"),
    ("logging.sample_every", lambda v: v >= 0, "≥ 0", "steps between sample grids; 0 is off"),
    ("logging.sample_count", lambda v: v >= 1, "≥ 1", "images per sample grid"),
    ("logging.sample_steps", lambda v: v >= 1, "≥ 1", "sampler steps of the grids"),
    ("logging.sample_cfg_scale", lambda v: v >= 1, "≥ 1", "the guided grid's CFG scale; 1 for no guided grid"),
    ("logging.cknna_every", lambda v: v >= 0, "≥ 0", "steps between CKNNA measurements; 0 is off"),
    ("logging.cknna_samples", lambda v: v >= 2, "≥ 2", "samples of the CKNNA batch"),
    ("logging.cknna_t", lambda v: 0 <= v <= 1, "in [0, 1]", "the CKNNA noise level"),
    ("logging.fid_every", lambda v: v >= 0, "≥ 0", "steps between FID measurements; 0 is off"),
    ("logging.fid_samples", lambda v: v >= 2, "≥ 2", "samples per FID measurement"),
)


def _check_ranges(config: Config) -> None:
    for key, allowed, rule, meaning in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value is not None and not allowed(value):
            raise ConfigError(f"{key}: must be {rule}, got {value!r} ({meaning})")


def dump_config(config: Config, path: str | Path) -> None:
    """Atomically: a kill while it is rewritten on resume keeps the previous file whole."""
    from erw_fast.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
