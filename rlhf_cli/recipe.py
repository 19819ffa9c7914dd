"""Recipe models: one frozen pydantic model per stage, `extra="forbid"`, discriminated on `stage`.

Field help is written once, in `Field(description=...)`; it feeds `--help`, `rlhf schema` and editor
hovers. Cross-field rules live in `model_validator(mode="after")` and say how to fix the recipe.
This module imports no torch: `rlhf validate` must answer instantly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Dtype = Literal["auto", "bf16", "fp16", "fp32"]
STAGES = ("pretrain", "sft", "train-rm", "dpo", "ppo", "grpo", "eval", "generate", "compare")


def is_function_ref(ref: str) -> bool:
    """`package.module:function`, and not an existing path (a directory named "a:b" stays a path)."""
    module, sep, name = ref.partition(":")
    return bool(sep) and name.isidentifier() and all(p.isidentifier() for p in module.split(".")) and not Path(ref).exists()


class Strict(BaseModel):
    # allow_inf_nan=False: YAML reads .inf and .nan, and 1e400 overflows to inf; no knob means either.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- model loading


class ScratchConfig(Strict):
    """Shape of a model built from scratch (`model.init: from_config`)."""

    family: Literal["llama"] = Field("llama", description="Architecture family of the new model.")
    hidden_size: int = Field(256, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, description="Number of decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads per layer.")
    num_kv_heads: int | None = Field(None, ge=1, description="Key/value heads (grouped-query attention); null = num_heads.")
    intermediate_size: int | None = Field(None, ge=8, description="MLP width; null = 4 x hidden_size rounded.")
    max_position_embeddings: int = Field(2048, ge=16, description="Longest sequence the model can see.")
    tie_word_embeddings: bool = Field(True, description="Share input and output embeddings (small models).")

    @model_validator(mode="after")
    def _heads_divide(self) -> ScratchConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick sizes where hidden_size = num_heads x head_dim"
            )
        # Rotary embeddings turn pairs of dimensions: an odd head_dim has no pair for its last one.
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"head_dim {self.hidden_size // self.num_heads} (hidden_size / num_heads) is odd, and rotary "
                "position embeddings need an even one: pick hidden_size and num_heads with an even quotient"
            )
        # Grouped-query attention shares each key/value head among an equal number of query heads.
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}: "
                "set model.config.num_kv_heads to a divisor of num_heads, or null"
            )
        return self


class ModelSpec(Strict):
    path: str = Field(
        ...,
        min_length=1,
        description="Hub id, local transformers directory, or a run directory (resolved through its run.json).",
    )
    gguf_file: str | None = Field(
        None, description="Load this GGUF file found under `path` (dequantized by transformers; needs `gguf`)."
    )
    dtype: Dtype = Field(
        "auto",
        description="auto picks bf16 where the hardware multiplies it fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp32.",
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off unless you trust it.")
    tokenizer: str | None = Field(None, description="Tokenizer location when it differs from `path`.")
    init: Literal["pretrained", "from_config"] = Field(
        "pretrained", description="pretrained loads weights; from_config builds a new model (pretrain only)."
    )
    config: ScratchConfig | None = Field(None, description="Model shape for `init: from_config`.")

    @model_validator(mode="before")
    @classmethod
    def _no_revision(cls, data: Any) -> Any:
        # A run records its base by path alone, so a later stage would load another revision than this one.
        if isinstance(data, dict) and "revision" in data:
            raise ValueError(
                "revision is not supported: every stage must load the same weights, so download that revision "
                "(hf download ID --revision REV --local-dir DIR) and set path: DIR"
            )
        return data

    @model_validator(mode="after")
    def _scratch_needs_config(self) -> ModelSpec:
        if self.init == "from_config" and self.config is None:
            raise ValueError("init is from_config but config is missing: add a config block (hidden_size, num_layers, ...)")
        if self.init == "pretrained" and self.config is not None:
            raise ValueError("config is set but init is pretrained: set init: from_config, or remove config")
        return self


class QuantSpec(Strict):
    bits: Literal[4, 8] | None = Field(None, description="4 or 8 to load the base through bitsandbytes; null = no quantization.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; NF4 suits normally distributed weights (QLoRA).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Dtype = Field("auto", description="dtype of the matmuls around the quantized weights.")


class LoraSpec(Strict):
    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(32, gt=0, description="Scale; the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="all-linear, or the module names to adapt (e.g. [q_proj, v_proj])."
    )


# --------------------------------------------------------------------------- data

Format = Literal["auto", "text", "messages", "prompt_completion", "preference", "ranked", "prompt"]


class SourceBase(Strict):
    """Where a stage's records come from, and which of them it reads."""

    train: str = Field(..., min_length=1, description="Local JSONL/JSON/Parquet/CSV/TXT file or directory, or a hub dataset name.")
    format: Format = Field("auto", description="auto detects the format from the columns and says what it found.")
    fields: dict[str, str] = Field(
        default_factory=dict, description="Column renames, e.g. {instruction: prompt, output: completion}."
    )
    split: str = Field("train", description="Split to read from a hub dataset.")
    max_samples: int | None = Field(None, ge=1, description="Use only the first N training samples (quick runs).")


class DataBase(SourceBase):
    """The data of a stage that also evaluates on held-out records while it trains."""

    eval: str | None = Field(None, description="Held-out file; null = split `eval_fraction` off train.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share of train held out when `eval` is null.")
    eval_max_samples: int | None = Field(
        None, ge=1, description="Evaluate on only the first N held-out samples (of `eval`, or of the share split off)."
    )


class TextData(DataBase):
    max_length: int = Field(1024, ge=8, description="Tokens per packed training sequence.")
    packing: bool = Field(True, description="Concatenate documents into full max_length blocks (no padding).")


class ChatData(DataBase):
    max_length: int = Field(1024, ge=8, description="Longest tokenized sample; longer ones are truncated and counted.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's own.")
    completion_only_loss: bool = Field(True, description="Train on completion / assistant tokens only.")
    padding_free: bool = Field(
        True, description="Concatenate each batch into one row with per-sample positions: no padding FLOPs."
    )


class PreferenceData(DataBase):
    max_length: int = Field(1024, ge=8, description="Longest tokenized prompt+response; longer ones are truncated and counted.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's own.")


class PromptData(SourceBase):
    """Prompts of an online stage (ppo, grpo): every one is trained on, none is held out; held-out prompts
    are `rlhf eval`'s."""

    max_prompt_length: int = Field(256, ge=1, description="Longest prompt in tokens; longer prompts are an error, not cut.")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's own.")


# --------------------------------------------------------------------------- training

Tracker = Literal["tensorboard", "wandb", "mlflow"]


class TrainSpec(Strict):
    epochs: float | None = Field(1, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Samples per device per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")
    logging_steps: int = Field(10, ge=1, description="Log metrics every N optimizer steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; null = at the end of each epoch.")
    save_steps: int = Field(200, ge=1, description="Write a resumable checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="Recompute activations to save memory: true, false, or auto (on only when memory asks for it)."
    )
    report_to: list[Tracker] = Field(
        default_factory=list, description="Extra experiment trackers; metrics.jsonl is always written."
    )

    @model_validator(mode="after")
    def _has_length(self) -> TrainSpec:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("both epochs and max_steps are null: set train.epochs (e.g. 1) or train.max_steps")
        return self


class PretrainTrainSpec(TrainSpec):
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (pretraining's default).")


class RewardTrainSpec(TrainSpec):
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (reward models' default).")


class DPOTrainSpec(TrainSpec):
    lr: float = Field(5e-6, gt=0, description="Peak learning rate; DPO wants rates far below SFT's.")


class GenerationSpec(Strict):
    max_new_tokens: int = Field(64, ge=1, description="Longest response in tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens; 0 = off.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a response (besides EOS).")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("an empty stop string would end every response at once: remove it")
        return v


class GreedyGenerationSpec(GenerationSpec):
    """Generation for eval: greedy unless the recipe says otherwise, also when other generation keys are set."""

    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 = greedy (eval's default: reproducible answers).")


class DiverseGenerationSpec(GenerationSpec):
    """Generation whose answers must differ (compare's K answers, a GRPO group): temperature 1 by default."""

    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 1 by default, since the answers must differ.")


def _adapter_rules(quant: QuantSpec, lora: LoraSpec | None) -> None:
    if quant.bits is not None and lora is None:
        raise ValueError(
            "quant.bits is set but lora is null: QLoRA trains adapters on a frozen quantized base; "
            "add a lora block or set quant.bits: null"
        )


# --------------------------------------------------------------------------- stages


class PretrainRecipe(Strict):
    """Causal-LM training on raw text: from scratch or continued pretraining."""

    stage: Literal["pretrain"] = "pretrain"
    model: ModelSpec
    quant: QuantSpec = Field(default_factory=QuantSpec)
    lora: LoraSpec | None = Field(None, description="Adapter settings; null = train all weights.")
    data: TextData
    train: PretrainTrainSpec = Field(default_factory=PretrainTrainSpec)
    output_dir: str = Field("runs/pretrain", min_length=1, description="Run directory this stage writes.")

    @model_validator(mode="after")
    def _rules(self) -> PretrainRecipe:
        _adapter_rules(self.quant, self.lora)
        if self.model.init == "from_config":
            if self.lora is not None or self.quant.bits is not None:
                raise ValueError("a model built from_config has no pretrained weights to freeze: set lora: null and quant.bits: null")
            if self.model.tokenizer is None:
                raise ValueError("model.init is from_config but model.tokenizer is null: name the tokenizer to build the vocabulary from")
        return self


class SFTRecipe(Strict):
    """Supervised fine-tuning on demonstrations (messages or prompt/completion)."""

    stage: Literal["sft"] = "sft"
    model: ModelSpec
    quant: QuantSpec = Field(default_factory=QuantSpec)
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="Adapter settings; null = full fine-tune.")
    data: ChatData
    train: TrainSpec = Field(default_factory=TrainSpec)
    output_dir: str = Field("runs/sft", min_length=1, description="Run directory this stage writes.")

    @model_validator(mode="after")
    def _rules(self) -> SFTRecipe:
        _adapter_rules(self.quant, self.lora)
        if self.data.format not in ("auto", "messages", "prompt_completion"):
            raise ValueError(f"sft trains on messages or prompt_completion data, not {self.data.format}: set data.format: auto")
        return self


class RewardRecipe(Strict):
    """Bradley-Terry reward model on preference pairs."""

    stage: Literal["train-rm"] = "train-rm"
    model: ModelSpec
    quant: QuantSpec = Field(default_factory=QuantSpec)
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="Adapter settings; null = full fine-tune.")
    data: PreferenceData
    train: RewardTrainSpec = Field(default_factory=RewardTrainSpec)
    center_rewards_coef: float | None = Field(
        0.01, ge=0, description="Penalty on (r_chosen + r_rejected)^2 keeping scores centred near 0; null = off."
    )
    output_dir: str = Field("runs/rm", min_length=1, description="Run directory this stage writes.")

    @model_validator(mode="after")
    def _rules(self) -> RewardRecipe:
        _adapter_rules(self.quant, self.lora)
        if self.data.format not in ("auto", "preference", "ranked"):
            raise ValueError(
                f"train-rm needs preference pairs or rankings, not {self.data.format}: set data.format: preference, ranked or auto"
            )
        return self


class DPOSpec(Strict):
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference: the implicit reward is beta x log-ratio (Rafailov et al. 2023)."
    )
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid",
        description="sigmoid: DPO; ipo: squared loss on the length-normalised margin (Azar et al. 2023); "
        "hinge: SLiC (Zhao et al. 2023); robust: DPO for noisy labels (Chowdhury et al. 2024), with label_smoothing.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="robust only: the assumed probability that a preference label is flipped (e.g. 0.1)."
    )
    precompute_ref: bool = Field(
        False, description="Score the data with the reference once before training: no reference pass or copy while training."
    )

    @model_validator(mode="after")
    def _smoothing_is_robust(self) -> DPOSpec:
        if self.label_smoothing and self.loss != "robust":
            raise ValueError(
                f"dpo.label_smoothing is {self.label_smoothing} but dpo.loss is {self.loss}: label smoothing is the "
                "robust loss's flip probability; set dpo.loss: robust, or dpo.label_smoothing: 0"
            )
        return self


class DPORecipe(Strict):
    """Direct Preference Optimization on preference pairs: no reward model, no sampling."""

    stage: Literal["dpo"] = "dpo"
    model: ModelSpec = Field(..., description="Starting policy, usually an sft run; it is also the reference.")
    quant: QuantSpec = Field(default_factory=QuantSpec)
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="Adapter settings; null = full fine-tune.")
    data: PreferenceData
    # DPO moves far on a small learning rate; trl's default is 1e-6 for full fine-tunes, LoRA takes more.
    train: DPOTrainSpec = Field(default_factory=DPOTrainSpec)
    dpo: DPOSpec = Field(default_factory=DPOSpec)
    output_dir: str = Field("runs/dpo", min_length=1, description="Run directory this stage writes.")

    @model_validator(mode="after")
    def _rules(self) -> DPORecipe:
        _adapter_rules(self.quant, self.lora)
        if self.data.format not in ("auto", "preference"):
            raise ValueError(f"dpo trains on preference pairs, not {self.data.format}: set data.format: preference or auto")
        return self


class RewardSource(Strict):
    path: str | None = Field(None, description="Reward model: a train-rm run, or any sequence-classification model.")
    function: str | None = Field(
        None, description="Rule-based reward `package.module:function(prompts, responses) -> list[float]` instead of a model."
    )
    gguf_file: str | None = Field(None, description="GGUF file under `path`.")
    dtype: Dtype = Field("auto", description="dtype of the reward model.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint.")

    @model_validator(mode="after")
    def _one_source(self) -> RewardSource:
        if (self.path is None) == (self.function is None):
            raise ValueError("give exactly one of reward.path (a reward model) or reward.function (package.module:function)")
        return self

    @field_validator("function")
    @classmethod
    def _looks_like_function(cls, v: str | None) -> str | None:
        if v is not None and not is_function_ref(v):
            raise ValueError(f"{v!r} is not package.module:function")
        return v


KLEstimator = Literal["k1", "k2", "k3", "abs"]

# Default PPO learning rates by what trains. Full: the 1e-5 order of the full-model PPO of Ziegler et al.
# 2019 and Ouyang et al. 2022. LoRA: about 10x the full fine-tuning rate, in RL as in SFT (Schulman et al.
# 2025, "LoRA Without Regret"; Hu et al. 2021 and Dettmers et al. 2023 train LoRA at 1e-4 to 2e-4).
PPO_LR_FULL = 1e-5
PPO_LR_LORA = 1e-4


class OnlineRLSpec(Strict):
    """What every online RL loop here shares (sampling, the clipped surrogate, KL, checkpoints); the
    subclasses add what a critic (PPO) or a group of answers per prompt (GRPO) needs."""

    section: ClassVar[str]
    iterations: int = Field(100, ge=1, description="Rollout + optimisation rounds.")
    rollout_batch_size: int = Field(64, ge=1, description="Prompts per rollout.")
    mini_batch_size: int = Field(8, ge=1, description="Samples per optimiser step within a PPO epoch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per mini-batch (memory).")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout.")
    lr: float | None = Field(
        None, gt=0, description=f"Learning rate of the trained roles; null = derived from what trains: {PPO_LR_LORA:g} for "
        f"LoRA adapters, {PPO_LR_FULL:g} for full fine-tuning (`--dry-run` says which)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    kl_coef: float = Field(0.05, ge=0, description="beta of the per-token KL penalty to the reference policy.")
    reward_clip: float | None = Field(None, gt=0, description="Clip scores to [-x, x]; null = off.")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtract this from the score of responses that never emit EOS; null = off, and a "
        "response cut at generation.max_new_tokens is scored as a finished turn (metrics: truncated_fraction)."
    )
    seed: int = Field(42, description="Seed for prompt order and sampling.")
    save_steps: int = Field(10, ge=1, description="Checkpoint every N iterations.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    report_to: list[Tracker] = Field(
        default_factory=list, description="Experiment trackers for the per-iteration metrics (tensorboard, wandb offline, "
        "mlflow in a local file store, all inside the run directory); metrics.jsonl is always written."
    )

    @model_validator(mode="after")
    def _batches_divide(self) -> OnlineRLSpec:
        # Each PPO epoch splits the rollout into equal mini-batches, and each mini-batch into equal micro-batches.
        key = self.section
        if self.rollout_batch_size % self.mini_batch_size:
            up = -(-self.rollout_batch_size // self.mini_batch_size) * self.mini_batch_size
            raise ValueError(
                f"rollout_batch_size {self.rollout_batch_size} is not a multiple of mini_batch_size {self.mini_batch_size}: "
                f"set {key}.rollout_batch_size to a multiple of it (e.g. {up}) or pick a mini_batch_size that divides it"
            )
        if self.mini_batch_size % self.grad_accum:
            raise ValueError(
                f"mini_batch_size {self.mini_batch_size} is not a multiple of grad_accum {self.grad_accum}: "
                f"set {key}.grad_accum to a divisor of {key}.mini_batch_size"
            )
        return self

    def learning_rate(self, lora: LoraSpec | None) -> tuple[float, str]:
        """lr, or the default for what trains (LoRA adapters take about 10x full fine-tuning's), and why."""
        if self.lr is not None:
            return self.lr, f"{self.section}.lr"
        if lora is None:
            return PPO_LR_FULL, f"{self.section}.lr unset: full fine-tuning default"
        return PPO_LR_LORA, f"{self.section}.lr unset: LoRA default (about 10x full fine-tuning's)"


class PPOSpec(OnlineRLSpec):
    section: ClassVar[str] = "ppo"
    value_clip_range: float = Field(0.2, gt=0, description="Value-prediction clip around the rollout values.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    kl_target: float | None = Field(None, gt=0, description="Adaptive KL: aim for this KL per sequence; null = fixed beta.")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL horizon in samples (Ziegler et al. 2019).")
    kl_estimator: KLEstimator = Field(
        "k1", description="Per-token KL estimate in the reward, the reported `kl` and the adaptive controller: k1 = "
        "log-ratio (unbiased, Ziegler et al. 2019), k3 = (r - 1) - log r (unbiased, never negative), k2 = half the "
        "squared log-ratio and abs = its absolute value (biased, low variance); see joschu.net/blog/kl-approx.html."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount; 1.0 is the RLHF default (Ouyang et al. 2022).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_rewards: bool = Field(
        False, description="Scale scores to unit variance over the rollout (mean kept, as in trl) before adding the KL penalty."
    )

    @model_validator(mode="after")
    def _kl_target_needs_a_kl(self) -> Any:
        if self.kl_target is not None and self.kl_estimator in ("k2", "abs"):
            raise ValueError(f"ppo.kl_target aims for a KL in nats per sequence, and kl_estimator {self.kl_estimator} "
                             "is not one (it is biased): use kl_estimator: k1 or k3 with it, or a fixed kl_coef")
        return self


Advantage = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
# Where each estimator's paper puts the KL to the reference: GRPO and Dr. GRPO as a k3 loss term (Shao et al.
# 2024; Liu et al. 2025), RLOO in the reward as PPO does (Ahmadian et al. 2024), REINFORCE++ per token in the
# reward (Hu 2025).
KL_IN: dict[str, Literal["loss", "reward"]] = {"grpo": "loss", "dr_grpo": "loss", "rloo": "reward", "reinforce_pp": "reward"}


class GRPOSpec(OnlineRLSpec):
    section: ClassVar[str] = "grpo"
    rollout_batch_size: int = Field(
        64, ge=1, description="Answers sampled per rollout: rollout_batch_size / group_size prompts, group_size answers each."
    )
    mini_batch_size: int = Field(16, ge=1, description="Answers per optimiser step within an epoch.")
    ppo_epochs: int = Field(
        1, ge=1, description="Passes over each rollout with the clipped surrogate (GRPO's mu; 1 = on-policy, as Shao et al.)."
    )
    group_size: int = Field(8, ge=1, description="Answers sampled per prompt; their scores are each other's baseline.")
    advantage: Advantage = Field(
        "grpo",
        description="grpo: (score - group mean) / group std, loss averaged per answer (Shao et al. 2024); dr_grpo: score - "
        "group mean, loss summed over tokens / the token budget, no length or std normalisation (Liu et al. 2025); "
        "rloo: score - mean of the other answers to the prompt (Ahmadian et al. 2024); reinforce_pp: KL-shaped "
        "returns normalised over the whole batch, no group baseline (REINFORCE++, Hu 2025).",
    )
    kl_coef: float = Field(
        0.04, ge=0, description="beta of the KL to the reference (0.04 in Shao et al. 2024); 0 = no reference pass at all."
    )
    kl_in: Literal["loss", "reward"] | None = Field(
        None, description="loss: beta x KL as a term of the loss (GRPO's); reward: subtracted from the reward per token "
        "(PPO's); null = the estimator's paper: loss for grpo and dr_grpo, reward for rloo and reinforce_pp."
    )
    kl_estimator: KLEstimator | None = Field(
        None, description="Per-token KL estimate (see ppo.kl_estimator); null = k3 in the loss (Shao et al. 2024), "
        "k1 in the reward (Ziegler et al. 2019)."
    )

    @model_validator(mode="after")
    def _groups_fit(self) -> GRPOSpec:
        if self.group_size < 2 and self.advantage != "reinforce_pp":
            raise ValueError(
                f"group_size 1 with advantage {self.advantage}: a group baseline needs at least 2 answers per prompt; "
                "set grpo.group_size to 2 or more (8 is usual), or grpo.advantage: reinforce_pp"
            )
        if self.rollout_batch_size % self.group_size:
            up = -(-self.rollout_batch_size // self.group_size) * self.group_size
            raise ValueError(
                f"rollout_batch_size {self.rollout_batch_size} is not a multiple of group_size {self.group_size}: it counts "
                f"answers, group_size per prompt; set grpo.rollout_batch_size to e.g. {up}"
            )
        return self

    @property
    def kl_placement(self) -> Literal["loss", "reward"]:
        return self.kl_in or KL_IN[self.advantage]

    @property
    def kl_kind(self) -> KLEstimator:
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k3" if self.kl_placement == "loss" else "k1"


def _online_rules(data: PromptData, generation: GenerationSpec, stage: str) -> None:
    if data.format not in ("auto", "prompt", "messages"):
        raise ValueError(f"{stage} samples from prompts, not {data.format}: set data.format: prompt or auto")
    if generation.temperature == 0:
        raise ValueError(f"generation.temperature is 0: {stage.upper()} must sample its rollouts; use e.g. 0.7")
    if generation.top_p < 1 or generation.top_k > 0:
        # The ratio and the KL are computed with the full tempered softmax: a truncated sampler draws the
        # answers from another distribution than the one they are scored with.
        raise ValueError(f"generation.top_p / top_k: {stage.upper()} scores its answers with the whole "
                         "distribution, so it must sample from it too: leave top_p: 1.0 and top_k: 0 (use temperature)")


class _OnlineRules(Strict):
    """The cross-field rules and the learning rate PPORecipe and GRPORecipe share; each declares its own fields,
    and `rl`, its loop's section (ppo or grpo)."""

    @model_validator(mode="after")
    def _rules(self) -> Any:
        _adapter_rules(self.quant, self.lora)
        _online_rules(self.data, self.generation, self.stage)
        return self

    def learning_rate(self) -> tuple[float, str]:
        return self.rl.learning_rate(self.lora)


class PPORecipe(_OnlineRules):
    """PPO against a reward model (or a rule-based reward function)."""

    stage: Literal["ppo"] = "ppo"
    policy: ModelSpec
    reward: RewardSource
    quant: QuantSpec = Field(default_factory=QuantSpec)
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="Policy/value adapter settings; null = full PPO.")
    data: PromptData
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    ppo: PPOSpec = Field(default_factory=PPOSpec)
    output_dir: str = Field("runs/ppo", min_length=1, description="Run directory this stage writes.")

    @property
    def rl(self) -> PPOSpec:
        return self.ppo


class GRPORecipe(_OnlineRules):
    """Critic-free RL: group_size answers per prompt, each scored against its group (GRPO and relatives)."""

    stage: Literal["grpo"] = "grpo"
    policy: ModelSpec
    reward: RewardSource
    quant: QuantSpec = Field(default_factory=QuantSpec)
    lora: LoraSpec | None = Field(default_factory=LoraSpec, description="Policy adapter settings; null = full fine-tune.")
    data: PromptData
    generation: DiverseGenerationSpec = Field(
        default_factory=DiverseGenerationSpec,
        description="Sampling settings; temperature 1 by default, since a group's answers must differ to carry signal.",
    )
    grpo: GRPOSpec = Field(default_factory=GRPOSpec)
    output_dir: str = Field("runs/grpo", min_length=1, description="Run directory this stage writes.")

    @property
    def rl(self) -> GRPOSpec:
        return self.grpo


# A recipe of one of the online RL loops in rlhf_cli/ppo/ (sampling from the policy against a reward).
OnlineRecipe = Union[PPORecipe, GRPORecipe]


Metric = Literal["perplexity", "reward", "win_rate", "kl", "rm_accuracy", "length", "reward_fn", "best_of_n", "dpo_accuracy"]

# The keys each metric puts into eval's output; gates (--fail-under / --fail-over) name these.
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "perplexity": ("perplexity",),
    # reward_length_corr: Spearman correlation of the reward model's score with answer length (tokens).
    "reward": ("reward", "reward_std", "reward_length_corr"),
    "win_rate": ("win_rate", "tie_rate", "reference_reward"),
    "kl": ("kl",),
    "rm_accuracy": ("rm_accuracy", "rm_margin"),
    # distinct_rate: share of different answers among the first answer to each prompt.
    "length": ("length", "eos_rate", "distinct_rate"),
    "reward_fn": ("reward_fn", "reward_fn_std", "reference_reward_fn", "reward_fn_gain_se"),
    "best_of_n": ("best_of_n_reward", "sample_reward"),
    "dpo_accuracy": ("dpo_accuracy", "dpo_margin"),
}
# Keys of one metric that exist only alongside another: the reference's answers come with win_rate.
NEEDS_METRIC: dict[str, str] = {"reference_reward_fn": "win_rate", "reward_fn_gain_se": "win_rate"}


class EvalData(Strict):
    prompts: str | None = Field(None, description="Prompts the model answers (reward, win_rate, kl, length, reward_fn).")
    text: str | None = Field(None, description="Text or chat data for perplexity.")
    preference: str | None = Field(None, description="Preference pairs or rankings for rm_accuracy (pairwise accuracy).")
    fields: dict[str, str] = Field(default_factory=dict, description="Column renames.")
    max_samples: int | None = Field(None, ge=1, description="Evaluate on the first N samples only.")
    max_length: int | None = Field(
        None, ge=8,
        description="Longest tokenized sample for perplexity and reward scoring; null = what the run trained with "
        "(its recipe's data.max_length), else 1024.",
    )


class EvalRecipe(Strict):
    """Metrics of a model (and gates on them for CI)."""

    stage: Literal["eval"] = "eval"
    model: ModelSpec | None = Field(None, description="Model to evaluate (run directory, local model or hub id).")
    reference: ModelSpec | None = Field(None, description="Reference model for win_rate and kl.")
    reward: ModelSpec | None = Field(None, description="Reward model for reward, win_rate and rm_accuracy.")
    reward_fn: str | None = Field(None, description="package.module:function(prompts, responses) -> list[float].")
    metrics: list[Metric] = Field(..., min_length=1, description="Metrics to compute.")
    data: EvalData = Field(default_factory=EvalData)
    generation: GreedyGenerationSpec = Field(default_factory=GreedyGenerationSpec)
    fail_under: dict[str, float] = Field(default_factory=dict, description="Gates: exit 4 when metric < value.")
    fail_over: dict[str, float] = Field(default_factory=dict, description="Gates: exit 4 when metric > value.")
    num_samples: int = Field(1, ge=1, description="Responses per prompt for reward, win_rate, kl, length and reward_fn.")
    best_of_n: int = Field(
        4, ge=2, description="Answers sampled per prompt for best_of_n (at generation.temperature, or 1 when greedy).",
    )
    beta: float | None = Field(
        None, gt=0, description="DPO beta for dpo_margin; null = the DPO run's own dpo.beta (accuracy does not depend on it).",
    )
    batch_size: int = Field(8, ge=1, description="Samples per forward pass.")
    seed: int = Field(42, description="Seed for sampling.")
    output_dir: str | None = Field(None, description="Write eval.json here when set.")

    @model_validator(mode="after")
    def _needs(self) -> EvalRecipe:
        m = set(self.metrics)
        if m - {"rm_accuracy"} and self.model is None:
            raise ValueError("model is missing: name the model to evaluate (--model RUN)")
        if m & {"reward", "win_rate", "best_of_n"} and self.reward is None:
            # A reward function is scored by metric reward_fn; `reward` is the reward model's score.
            scored_by_fn = "reward" in m and self.reward_fn is not None
            raise ValueError(
                "reward, win_rate and best_of_n need a reward model: set reward.path (--reward RUN)"
                + (f"; to score with reward_fn {self.reward_fn}, use --metric reward_fn" if scored_by_fn else "")
            )
        if "rm_accuracy" in m and self.reward is None and self.model is None:
            raise ValueError("rm_accuracy needs a reward model: set reward.path (--reward RUN), or --model RUN of a train-rm run")
        if m & {"win_rate", "kl"} and self.reference is None:
            raise ValueError("win_rate and kl compare against a reference: set reference.path (--reference RUN)")
        if "reward_fn" in m and self.reward_fn is None:
            raise ValueError("metric reward_fn needs reward_fn: package.module:function")
        if m & {"reward", "win_rate", "kl", "length", "reward_fn", "best_of_n"} and self.data.prompts is None:
            raise ValueError("generation metrics need prompts: set data.prompts (--prompts FILE)")
        if "perplexity" in m and self.data.text is None:
            raise ValueError("perplexity needs data.text (--text FILE)")
        if m & {"rm_accuracy", "dpo_accuracy"} and self.data.preference is None:
            raise ValueError("rm_accuracy and dpo_accuracy need data.preference (--preference FILE)")
        available = [k for metric in self.metrics for k in METRIC_KEYS[metric] if NEEDS_METRIC.get(k, metric) in m]
        for key, gates in (("fail_under", self.fail_under), ("fail_over", self.fail_over)):
            alone = [name for name in gates if name in NEEDS_METRIC and NEEDS_METRIC[name] not in m and name in
                     {k for metric in self.metrics for k in METRIC_KEYS[metric]}]
            if alone:
                raise ValueError(f"{key}: {', '.join(alone)} compares with the reference's answers, which only "
                                 f"win_rate makes: add --metric win_rate (and --reference RUN)")
            unknown = [name for name in gates if name not in available]
            if unknown:
                raise ValueError(
                    f"{key}: {', '.join(unknown)} is not computed by the metrics asked for; "
                    f"available: {', '.join(available)} (add the metric with --metric)"
                )
        return self


class GenerateRecipe(Strict):
    """Sampling from a model; JSONL on stdout."""

    stage: Literal["generate"] = "generate"
    model: ModelSpec
    quant: QuantSpec = Field(default_factory=QuantSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    num_samples: int = Field(1, ge=1, description="Responses per prompt.")
    batch_size: int = Field(8, ge=1, description="Answers sampled per generate call (num_samples per prompt).")
    seed: int = Field(42, description="Same seed, same output.")
    raw: bool = Field(False, description="Send prompts as they are, without the chat template.")
    merge: bool = Field(False, description="Merge LoRA adapters into the base in memory (faster generation).")
    best_of: bool = Field(False, description="Keep the highest-scoring of num_samples answers per prompt (best-of-n).")
    reward: str | None = Field(
        None, description="Scores for best_of: a reward model (train-rm run or model) or package.module:function."
    )
    all: bool = Field(False, description="With best_of: write every candidate with its score and whether it is the best.")

    @model_validator(mode="after")
    def _best_of_needs(self) -> GenerateRecipe:
        if self.best_of and self.reward is None:
            raise ValueError("best_of needs something to score with: set reward (--reward runs/rm or package.module:function)")
        if self.best_of and self.num_samples < 2:
            raise ValueError("best_of picks among num_samples answers: set num_samples to 2 or more (-n 4)")
        if not self.best_of and (self.reward is not None or self.all):
            raise ValueError("reward and all are used by best_of only: add --best-of, or drop them")
        return self


class CompareRecipe(Strict):
    """K answers per prompt as ranked data for the next reward model: scored, or left for people to rank."""

    stage: Literal["compare"] = "compare"
    model: ModelSpec
    prompts: str = Field(..., min_length=1, description="Prompt file (JSONL/JSON/TXT): what the answers respond to.")
    quant: QuantSpec = Field(default_factory=QuantSpec)
    generation: DiverseGenerationSpec = Field(default_factory=DiverseGenerationSpec, description="Sampling settings.")
    num_samples: int = Field(4, ge=2, description="Answers per prompt (K); every pair of a ranking is trained on.")
    reward: str | None = Field(None, description="Score the answers: a reward model (train-rm run) or package.module:function.")
    for_labelling: bool = Field(
        False, description="Write the answers shuffled with an empty ranking for people to fill in, instead of scores."
    )
    batch_size: int = Field(8, ge=1, description="Answers sampled per generate call (num_samples per prompt).")
    seed: int = Field(42, description="Same seed, same answers and order.")
    output: str | None = Field(
        None, min_length=1,
        description="JSONL file to append the lines to, each batch's once done (null: stdout). When it exists, the "
        "prompts whose lines it holds are skipped: the same command run again continues an interrupted run.",
    )

    @model_validator(mode="after")
    def _one_judge(self) -> CompareRecipe:
        if (self.reward is None) == (not self.for_labelling):
            raise ValueError("give exactly one judge: reward (--reward runs/rm or package.module:function) or --for-labelling")
        if self.generation.temperature == 0:
            raise ValueError("generation.temperature is 0: the num_samples answers to a prompt would be one greedy answer "
                             "repeated, with no pair to learn from; sample them, e.g. --temperature 1.0")
        return self


Recipe = Annotated[
    Union[PretrainRecipe, SFTRecipe, RewardRecipe, DPORecipe, PPORecipe, GRPORecipe, EvalRecipe, GenerateRecipe,
          CompareRecipe],
    Field(discriminator="stage"),
]

RECIPE_CLASSES: dict[str, type[Strict]] = {
    "pretrain": PretrainRecipe,
    "sft": SFTRecipe,
    "train-rm": RewardRecipe,
    "dpo": DPORecipe,
    "ppo": PPORecipe,
    "grpo": GRPORecipe,
    "eval": EvalRecipe,
    "generate": GenerateRecipe,
    "compare": CompareRecipe,
}
