"""The model configuration: a frozen, hashable dataclass passed to ``jit`` as a static argument.

It is built from a Hub ``config.json`` (the ``step3_vl`` wrapper with ``text_config``, or a bare
``step3_text`` config) or from a preset in ``configs/`` (``step3``, ``bench``, ``tiny``), which are
themselves bare Hub-format text configs. Quirks handled here (``shared/spec/model.md`` §1, §5):
``moe_layers_enum`` is a comma-separated string (a list is accepted too), ``max_position_embedding``
is singular, ``rope_theta`` may sit under ``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from step3_jax.errors import ConfigError

VOCAB_PAD_MULTIPLE = 128
MoEImpl = Literal["auto", "loop", "ragged", "blocks"]
AttentionImpl = Literal["auto", "plain", "blocked"]
ATTENTION_IMPLS = ("auto", "plain", "blocked")
# Prompts longer than this are prefilled this many tokens at a time against the growing cache
# (decoder.prefill's chunked path, the runtimes' default), so activation memory follows the
# chunk, not the prompt (peak RSS flat at 2.3 GB from 1K to 32K tokens on the bench shapes;
# at 8K the speed equals the whole prompt's within the loaded machine's noise: BENCHMARKS.md
# "Long context"). Here, not in runtime/generate.py, so the CLI names it without JAX.
DEFAULT_PREFILL_CHUNK = 2048
# The continuous-batching engine's defaults (runtime/engine.py; here so the CLI names them
# without JAX): sequences in flight, KV-cache page size in tokens, and decode steps per on-device
# burst. The burst length, measured (tools/bench_engine.py, BENCHMARKS.md "Engine"): a burst's
# host round trip costs ~3.5 ms on this CPU; the tiny preset (~0.5 ms steps) decodes 3.6-5.5x
# faster at 8 than at 1 (16: a further 1.2-1.5x), the 2-layer bench model (~60 ms steps at batch
# 8) shows no difference from 1 to 16 within load noise. 8 takes most of the small-model gain
# while a burst (the granularity of token delivery, and of admitting and prefilling between
# bursts) stays short.
DEFAULT_MAX_NUM_SEQS = 8
DEFAULT_PAGE_SIZE = 128
DEFAULT_DECODE_STEPS = 8


def check_numerics(cfg, bad) -> None:
    """The numerics fields every model family's config shares (``dtype``, ``moe_impl``,
    ``attention_impl``); ``bad(message)`` raises the family's one-line error."""
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        bad(f"dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.moe_impl not in ("auto", "loop", "ragged", "blocks"):
        bad(f"moe_impl must be auto, loop, ragged or blocks, got {cfg.moe_impl!r}")
    if cfg.attention_impl not in ATTENTION_IMPLS:
        bad(f"attention_impl must be {', '.join(ATTENTION_IMPLS)}, got {cfg.attention_impl!r}")


@dataclasses.dataclass(frozen=True)
class Step3Config:
    """Step-3 text-decoder hyper-parameters plus the numerics to run them with."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    share_q_dim: int
    intermediate_size: int
    moe_num_experts: int
    moe_top_k: int
    moe_intermediate_size: int
    share_expert_dim: int
    moe_layers: tuple[int, ...]
    vocab_size: int
    num_attention_groups: int = 1
    norm_expert_weight: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embedding: int = 65536
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Numerics, not architecture: the dtype weights and activations are held in (float32 by
    # default: XLA:CPU runs bfloat16 matmuls ~25x slower) and the MoE kernel choice
    # ("auto": the expert loop on CPU, grouped ragged_dot on GPU/TPU; "blocks": the
    # differentiable kernel training uses on CPU, see moe.py), and the attention kernel choice
    # ("auto": the plain product where its score array is small, blocked online softmax where
    # it is not; see attention.py).
    dtype: str = "float32"
    moe_impl: MoEImpl = "auto"
    attention_impl: AttentionImpl = "auto"
    name: str = "step3"

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"config {self.name!r}: {msg}")

        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "share_q_dim", "vocab_size", "max_position_embedding"):
            if int(getattr(self, key)) <= 0:
                bad(f"{key} must be positive, got {getattr(self, key)}")
        if self.num_attention_groups != 1:
            bad(f"num_attention_groups={self.num_attention_groups}: Step-3's MFA has exactly one "
                "shared K head and one shared V head (num_attention_groups=1)")
        if self.head_dim % 2:
            bad(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            bad(f"moe_layers_enum names a layer outside 0..{self.num_hidden_layers - 1}: "
                f"{list(self.moe_layers)}")
        if self.moe_layers:
            if self.moe_num_experts <= 0 or self.moe_intermediate_size <= 0:
                bad("MoE layers need moe_num_experts > 0 and moe_intermediate_size > 0")
            if not 0 < self.moe_top_k <= self.moe_num_experts:
                bad(f"moe_top_k={self.moe_top_k} must be in 1..moe_num_experts="
                    f"{self.moe_num_experts}")
        if len(self.moe_layers) < self.num_hidden_layers and self.intermediate_size <= 0:
            bad("dense layers need intermediate_size > 0")
        check_numerics(self, bad)

    # ----- derived quantities ---------------------------------------------------------------
    @property
    def padded_vocab(self) -> int:
        """Vocabulary rounded up to a multiple of 128 so it shards evenly; the padding is masked."""
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def kv_elements_per_token(self) -> int:
        """KV-cache values per token over all layers: one K and one V head of ``head_dim`` each."""
        return self.num_hidden_layers * 2 * self.num_attention_groups * self.head_dim

    def replace(self, **changes) -> "Step3Config":
        return dataclasses.replace(self, **changes)

    def to_hub_dict(self) -> dict:
        """A bare Hub text config (``step3_text``) that :func:`from_hub_dict` reads back to
        this config's architecture (numerics fields ``dtype``, ``moe_impl`` and ``attention_impl``
        are not stored)."""
        raw = {"_name_or_path": self.name, "model_type": "step3_text",
               **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("dtype", "moe_impl", "attention_impl", "name", "moe_layers",
                                    "eos_token_ids")}}
        raw["moe_layers_enum"] = ",".join(map(str, self.moe_layers))
        eos = list(self.eos_token_ids)
        raw["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        return raw


# ----- building a config from a Hub dict ----------------------------------------------------------

# Hub ``model_type`` values of the Step-3.5 family (``shared/spec/step35.md``): Step-3.5-Flash's
# text model, and Step-3.7's vision wrapper holding it under ``text_config``.
STEP35_MODEL_TYPES = ("step3p5", "step3p7")


def step35_model_type(raw) -> str | None:
    """The Step-3.5-family ``model_type`` of a Hub dict (top level or ``text_config``), or None."""
    if not isinstance(raw, dict):
        return None
    text = raw.get("text_config")
    for value in (raw.get("model_type"), text.get("model_type") if isinstance(text, dict) else None):
        if value in STEP35_MODEL_TYPES:
            return value
    return None


_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
             "share_q_dim", "vocab_size")


def _moe_layers(text: dict, layers: int, experts: int, where: str) -> tuple[int, ...]:
    """``moe_layers_enum`` (a string or a list) as sorted layer indices. Missing while experts
    are configured is an error, not a guess: StepFun's model code would make every layer after
    the first MoE, its config class Step-3's 4..59, whatever the depth."""
    if "moe_layers_enum" not in text and experts > 0:
        after_first = (",".join(map(str, range(1, layers))) if layers <= 6
                       else f"1,2,...,{layers - 1}")
        raise ConfigError(f"{where}: moe_layers_enum is missing ({experts} experts configured "
                          f"but no MoE layers named): add it, e.g. \"{after_first}\" for every "
                          "layer after the first")
    raw = text.get("moe_layers_enum")
    if raw is None or raw == "":
        return ()
    try:
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(sorted({int(str(x).strip()) for x in items if str(x).strip()}))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: moe_layers_enum must be a comma-separated string or a list "
                          f"of layer indices, got {raw!r}") from None


def from_hub_dict(raw: dict, *, where: str = "config.json", **overrides) -> Step3Config:
    """Build a :class:`Step3Config` from a Hub config dict (``step3_vl`` wrapper or bare text)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    text = raw.get("text_config", raw)
    if not isinstance(text, dict):
        raise ConfigError(f"{where}: text_config must be a JSON object")
    family = step35_model_type(raw)
    if family is not None:
        raise ConfigError(f"{where}: model_type {family!r} is a Step-3.5-family model: the "
                          "Step-3 model code does not run it (step3-jax info and cost read it)")
    missing = [k for k in _REQUIRED if k not in text]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    rope_theta = text.get("rope_theta")
    if rope_theta is None:
        rope_theta = (text.get("rope_parameters") or {}).get("rope_theta", 500000.0)
    eos = text.get("eos_token_id", raw.get("eos_token_id"))
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    bos = text.get("bos_token_id", raw.get("bos_token_id"))
    max_pos = text.get("max_position_embedding", text.get("max_position_embeddings",
                                                          text.get("max_seq_len", 65536)))

    def num(key, default, kind=int):
        value = text.get(key, default)
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}") from None

    fields = dict(
        hidden_size=num("hidden_size", None),
        num_hidden_layers=num("num_hidden_layers", None),
        num_attention_heads=num("num_attention_heads", None),
        num_attention_groups=num("num_attention_groups", 1),
        head_dim=num("head_dim", None),
        share_q_dim=num("share_q_dim", None),
        intermediate_size=num("intermediate_size", 0),
        moe_num_experts=num("moe_num_experts", 0),
        moe_top_k=num("moe_top_k", 0),
        moe_intermediate_size=num("moe_intermediate_size", 0),
        share_expert_dim=num("share_expert_dim", num("moe_intermediate_size", 0)),
        moe_layers=_moe_layers(text, num("num_hidden_layers", None), num("moe_num_experts", 0),
                               where),
        norm_expert_weight=bool(text.get("norm_expert_weight", False)),
        vocab_size=num("vocab_size", None),
        rms_norm_eps=num("rms_norm_eps", 1e-5, float),
        rope_theta=float(rope_theta),
        max_position_embedding=int(max_pos),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings",
                                                                         False))),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        name=str(raw.get("_name_or_path") or text.get("_name_or_path") or where),
    )
    fields.update(overrides)
    return Step3Config(**fields)


def presets_dir() -> Path:
    """``configs/``: beside the package in a wheel install, at the repository root in a checkout."""
    package = Path(__file__).resolve().parent.parent  # step3_jax/
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None


def read_config_source(spec: str | Path) -> tuple[dict, str, str | None]:
    """The raw JSON a config spec names: ``(dict, where, preset name or None)``. A spec is a
    preset name (``tiny``), a ``config.json`` file, or a checkpoint directory."""
    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    if not path.exists() and "/" not in spec_str and not spec_str.endswith(".json"):
        if spec_str not in preset_names():
            raise ConfigError(f"unknown config {spec_str!r}: not a file, and not one of the presets "
                              f"{', '.join(preset_names())}")
        return _read_json(presets_dir() / f"{spec_str}.json"), f"preset {spec_str}", spec_str
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no such file (a checkpoint directory needs a config.json)")
    return _read_json(path), str(path), None


def load_config(spec: str | Path, **overrides) -> Step3Config:
    """A Step-3 config from a preset name (``tiny``), a ``config.json`` file, or a checkpoint
    directory. A Step-3.5-family config is refused (:data:`STEP35_MODEL_TYPES`); its reader is
    ``step35_config.load_any_config``."""
    raw, where, preset = read_config_source(spec)
    if preset is not None:
        overrides = {"name": preset, **overrides}
    return from_hub_dict(raw, where=where, **overrides)
