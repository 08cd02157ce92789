"""LoRA through PEFT: low-rank adapters on the decoder's linears (and a mixture's stacked expert weights); only
the adapters train.

``peft=lora`` (configs/peft/lora.yaml) sets the rank, alpha, dropout and the target modules by their
Hugging Face names (``q_proj`` ... ``down_proj``, or ``all-linear``: every linear of the decoder blocks,
not the output head). PEFT's own layers are injected into nemo_lite's model (:func:`peft.inject_adapter_in_model`
with the targets spelled as full module paths, since PEFT's ``all-linear`` only knows transformers models); every
other parameter is frozen, so the optimizer, the gradient norm and the fast step's converters see only the
adapters. ``peft.target_parameters`` (``gate_up_proj``, ``down_proj``) adapts the stacked expert weights
``[E, ...]`` of a mixture of experts through PEFT's parameter targeting (``LoraConfig.target_parameters``:
one rank-``r`` pair per expert, applied as a parametrization of the weight during the forward).

``peft.use_rslora`` and ``peft.use_dora`` are PEFT's rsLoRA and DoRA; ``peft.adapter_path`` starts from an existing
PEFT adapter, whose settings become the run's (:mod:`.peft_adapter` reads it and maps its keys back).

What this module also owns, because only it knows the adapters' names:

- what a training checkpoint holds: the adapters (the trainable parameters); the base comes from
  ``model.pretrained_path`` again on resume, checked against :func:`base_fingerprint`
  (:meth:`LoraConverter.check_record`);
- :func:`save_adapter`: ``run_dir/adapter``, a PEFT adapter directory under the Hugging Face key names
  (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), as ``PeftModel.save_pretrained`` writes it
  for a transformers model;
- :func:`merged_model`: the base read again from disk in float32 with the adapters merged by PEFT (``scaling * B @ A``;
  DoRA's magnitudes too), for ``run_dir/hf``. The base checkpoint on disk is only ever read.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.errors import ConfigError
from nemo_lite.training import distributed
from nemo_lite.training.converters import nf4
from nemo_lite.training.converters.base import ModelConverter, register_converter
from nemo_lite.training.converters.peft_keys import (
    ADAPTER_CONFIG,
    ADAPTER_NAME,
    ADAPTER_WEIGHTS,
    ALL_LINEAR,
    PeftSection,
    block_linears,
    block_stacked_weights,
    hf_adapter_key,
    hf_parameter_target,
)

PEFT_METHODS = ("none", "lora")
# A base this big gets a line saying it is being read whole.
FINGERPRINT_NOTICE_BYTES = 2 * 10**9
FINGERPRINT_CHUNK = 2**24
# The value of a checkpoint record's key for checkpoints written before the key existed.
RECORD_DEFAULTS: dict[str, Any] = {"parameters": [], "quantize_base": "none", "use_rslora": False, "use_dora": False}


@register_converter("peft")
class LoraConverter(ModelConverter):
    """Injects PEFT LoRA layers into the targeted linears and freezes everything else.

    ``frozen_dtype`` (e.g. ``torch.bfloat16`` when the run autocasts to bf16 on a GPU) stores the frozen
    linears' weights in that dtype: autocast would round them to it before every matmul anyway, so the
    values the model computes with do not change, and the float32 copies (and their casts) are gone.
    The merged export reads the float32 base from disk again, so nothing is lost.

    ``base_dir`` is the local directory of the base (``model.pretrained_path``, given as ``base_path``): the
    checkpoints' record fingerprints it and the merged model reads it again. ``adapter`` (a
    :class:`~nemo_lite.training.converters.peft_adapter.PeftAdapter`, ``peft.adapter_path``) is loaded into the
    injected layers; ``section`` then holds its settings.
    """

    order = 10  # before float8: the adapters wrap the base linears that float8 may then convert
    writes_record = True
    saves_only_trainable = True
    builds_final_model = True

    def __init__(
        self,
        section: PeftSection,
        *,
        frozen_dtype: torch.dtype | None = None,
        base_dir: Path | None = None,
        base_path: str | None = None,
        adapter: Any = None,
    ) -> None:
        self.check_section(section)
        self.settings = section
        self.frozen_dtype = frozen_dtype
        self.base_dir, self.base_path = base_dir, base_path
        self.description = f"LoRA (PEFT): r={section.r}, alpha={section.alpha:g}, dropout={section.dropout:g}"
        self.description += ", rsLoRA" * section.use_rslora + ", DoRA" * section.use_dora
        self.adapter = adapter  # a PeftAdapter to start from (peft.adapter_path, with section its settings)
        self.target_names: list[str] = []  # leaf names adapted (q_proj, ...), set by convert
        self.module_paths: list[str] = []
        self.parameter_paths: list[str] = []  # stacked weights adapted (layers.0.mlp.experts.gate_up_proj, ...)
        self.family: Any = None  # the model's family entry, set by convert (the merge builds the model again)
        self._record: dict[str, Any] | None = None
        self._final_adapters: dict[str, torch.Tensor] = {}  # set by final_model, for export_extra
        # QLoRA: the dtype the base is quantized from and dequantizes to, and the run's device where the base loaded
        # on the CPU goes (set by load_device).
        self.quantized_dtype = (frozen_dtype or torch.float32) if section.quantize_base != "none" else None
        self.device: torch.device | None = None

    @classmethod
    def enabled(cls, section: PeftSection) -> bool:
        return section.method != "none"

    @staticmethod
    def check_section(peft: PeftSection) -> None:
        """The ``peft`` section's own values, in one line each."""
        if peft.method not in PEFT_METHODS:
            raise ConfigError(f"peft.method={peft.method!r} is not valid; choose one of: {', '.join(PEFT_METHODS)}")
        quantize = peft.quantize_base
        if quantize not in nf4.QUANTIZE_CHOICES:
            raise ConfigError(
                f"peft.quantize_base={quantize!r} is not valid; choose one of: {', '.join(nf4.QUANTIZE_CHOICES)}"
            )
        if peft.method == "none":
            if quantize != "none":
                raise ConfigError(
                    f"peft.quantize_base={quantize} quantizes the frozen base under LoRA adapters, but "
                    "peft.method=none trains every weight: add peft=lora, or leave peft.quantize_base=none"
                )
            if peft.adapter_path is not None:
                raise ConfigError(
                    f"peft.adapter_path={peft.adapter_path} trains a LoRA adapter on, but peft.method is none: add "
                    "peft=lora (the group also sets LoRA's learning rate)"
                )
            return
        if isinstance(peft.r, bool) or not isinstance(peft.r, int) or peft.r <= 0:
            raise ConfigError(f"peft.r={peft.r!r} must be an integer > 0 (the adapters' rank)")
        if not peft.alpha > 0 or peft.alpha == float("inf"):
            raise ConfigError(f"peft.alpha={peft.alpha!r} must be a finite number > 0")
        if not 0.0 <= peft.dropout < 1.0:
            raise ConfigError(f"peft.dropout={peft.dropout!r} must be in [0.0, 1.0)")
        targets = list(peft.target_modules)
        if not targets and not peft.target_parameters:
            raise ConfigError(
                "peft.target_modules and peft.target_parameters are both empty; give module names (q_proj, v_proj, "
                "...) or [all-linear], or stacked expert weights (gate_up_proj, down_proj)"
            )
        if peft.target_parameters and peft.dropout:
            raise ConfigError(
                f"peft.dropout={peft.dropout!r} with peft.target_parameters: PEFT's LoRA on stacked weights has no "
                "dropout; set peft.dropout=0.0"
            )
        if ALL_LINEAR in targets and len(targets) > 1:
            raise ConfigError(f"peft.target_modules={targets}: all-linear already names every linear; give it alone")
        if quantize != "none" and peft.target_parameters:
            raise ConfigError(
                f"peft.quantize_base={quantize} with peft.target_parameters={list(peft.target_parameters)}: only "
                "linears are quantized and PEFT's per-expert LoRA needs the stacked weights unquantized; drop one"
            )
        if quantize != "none" and peft.use_dora:
            raise ConfigError(
                f"peft.quantize_base={quantize} with peft.use_dora=true: PEFT's DoRA reads the base weight itself, "
                "which is 4-bit here; use plain LoRA on the quantized base, or DoRA with peft.quantize_base=none"
            )
        for key in ("use_rslora", "use_dora"):
            if not isinstance(getattr(peft, key), bool):
                raise ConfigError(f"peft.{key}={getattr(peft, key)!r} must be true or false")
        if peft.use_dora and peft.target_parameters:
            raise ConfigError(
                "peft.use_dora=true with peft.target_parameters: PEFT has no DoRA for stacked expert weights; "
                "adapt the experts with plain LoRA (peft.use_dora=false) or leave peft.target_parameters empty"
            )

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        cls.check_section(cfg.peft)
        if not cls.enabled(cfg.peft):
            return
        import importlib.util

        if cfg.model.pretrained_path is None:
            raise ConfigError(
                "peft=lora adapts a pretrained model, but model.pretrained_path is not set: give a checkpoint "
                "(a from-scratch model has nothing worth freezing; train it fully with peft=none)"
            )
        if importlib.util.find_spec("peft") is None:
            raise ConfigError("peft=lora needs the peft package: pip install 'nemo_lite[peft]'")
        quantize = cfg.peft.quantize_base
        if quantize != "none":
            missing = nf4.nf4_missing()
            if missing is not None:
                raise ConfigError(f"peft.quantize_base={quantize} needs {missing}")
            if cfg.float8.enabled:
                raise ConfigError(
                    f"peft.quantize_base={quantize} with float8.enabled=true: float8 casts high-precision weights and "
                    "the quantized base has 4-bit ones; turn one of them off"
                )
        if cfg.peft.adapter_path is not None:
            from nemo_lite.training.converters import peft_adapter

            peft_adapter.check_adapter_config(cfg)

    @classmethod
    def from_config(cls, cfg: Any, *, autocast_dtype: torch.dtype | None, pretrained_dir: Path | None):
        section, adapter = cfg.peft, None
        if section.adapter_path is not None:
            from nemo_lite.training.converters import peft_adapter

            adapter = peft_adapter.read_adapter(section.adapter_path)
            section = peft_adapter.section_of(adapter, section)
            cls.check_section(section)  # the adapter's settings beside this run's others (quantize_base, ...)
        base_path = cfg.model.pretrained_path
        return cls(section, frozen_dtype=autocast_dtype, base_dir=pretrained_dir, base_path=base_path, adapter=adapter)

    @classmethod
    def training_bytes(cls, cfg: Any, config: Any, *, autocast_dtype: torch.dtype | None) -> int:
        """A floor under the adapted model's training state: the frozen linears in ``autocast_dtype`` (as
        :meth:`convert` stores them) or, quantized, in NF4, the other weights (embeddings, norms) in float32; the
        adapters of the targeted linears in float32 with their gradient and two AdamW moments (the stacked weights'
        adapters are left out: a floor)."""
        from nemo_lite.components.models import family_of_config

        family = family_of_config(config)
        with torch.device("meta"):
            model = family.build(config)
        frozen_bytes = 4 if autocast_dtype is None else autocast_dtype.itemsize
        linears = block_linears(model, family)
        wanted = set(linears.values()) if ALL_LINEAR in cfg.peft.target_modules else set(cfg.peft.target_modules)
        total, counted = 0, set()
        for path, leaf in linears.items():
            weight = model.get_submodule(path).weight
            counted.add(id(weight))
            quantized = cfg.peft.quantize_base != "none" and nf4.nf4_keep_reason(weight.shape) is None
            total += nf4.nf4_bytes(weight.numel()) if quantized else frozen_bytes * weight.numel()
            if leaf in wanted:
                total += 16 * cfg.peft.r * sum(weight.shape)
        for module in model.modules():  # the frozen linears outside the blocks (an untied output projection)
            if isinstance(module, nn.Linear) and id(module.weight) not in counted:
                counted.add(id(module.weight))
                total += frozen_bytes * module.weight.numel()
        return total + 4 * sum(p.numel() for p in model.parameters() if id(p) not in counted)

    def load_device(self, device: torch.device) -> torch.device:
        """Quantized, the float32 base is loaded on the CPU: each frozen linear goes to ``device`` alone, is
        quantized there, and the rest of the model follows (:meth:`convert`), so the device never holds the whole
        float32 base."""
        if self.settings.quantize_base == "none":
            return device
        self.device = device
        return torch.device("cpu")

    def convert(self, model: nn.Module, family: Any) -> None:
        import peft

        self.family = family
        if self.adapter is not None:  # the adapter's targets, checked here so that a refusal names the adapter
            from nemo_lite.training.converters import peft_adapter

            peft_adapter.check_base(self.adapter, model, family, section=self.settings, base=self.base_path)
        linears = block_linears(model, family)
        existing = sorted(set(linears.values()))
        wanted = list(self.settings.target_modules)
        if ALL_LINEAR in wanted:
            wanted = existing
        unknown = [name for name in wanted if name not in existing]
        weights = block_stacked_weights(model, family)
        stacked = sorted(set(weights.values()) & set(unknown))
        if stacked:
            raise ConfigError(
                f"peft.target_modules {stacked} are stacked weights, not linears: name them in "
                f"peft.target_parameters={stacked} (LoRA per expert); the decoder linears are: {', '.join(existing)}"
            )
        if unknown:
            raise ConfigError(
                f"peft.target_modules {unknown} match(es) no module of this model; its decoder linears are: "
                f"{', '.join(existing)} (or all-linear)"
            )
        wanted_weights = list(self.settings.target_parameters)
        unknown = [name for name in wanted_weights if name not in set(weights.values())]
        if unknown:
            have = ", ".join(sorted(set(weights.values()))) or "none (it has no mixture of experts)"
            raise ConfigError(
                f"peft.target_parameters {unknown} match(es) no stacked weight of this model; its stacked expert "
                f"weights are: {have}"
            )
        self.target_names = sorted(set(wanted))
        self.module_paths = [path for path, leaf in linears.items() if leaf in self.target_names]
        self.parameter_paths = [path for path, leaf in weights.items() if leaf in wanted_weights]
        for param in model.parameters():
            param.requires_grad_(False)
        config = lora_config(self.settings, self.module_paths, target_parameters=self.parameter_paths)
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        if self.adapter is not None:
            from nemo_lite.training.converters import peft_adapter

            peft_adapter.load_into(model, self.adapter, base=self.base_path)
            self.description += f", from the adapter {self.adapter.source}"
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.ParamWrapper):
                # PEFT registers a parametrization on the experts in every forward, a new class each time: dynamo
                # would recompile the experts' frame each step until its limit and then run it eager anyway, so
                # it runs eager from the start (recursive: the nested wrappers and the experts under them).
                module.forward = torch.compiler.disable(module.forward)
            if isinstance(module, peft.tuners.lora.dora.DoraLinearLayer):
                # PEFT's DoRA asks the base weight's type for its module name (dequantize_module_weight), which
                # dynamo cannot trace: under trainer.compile the magnitude's few ops run eager, the block compiled.
                module.forward = torch.compiler.disable(module.forward)
            if isinstance(module, peft.tuners.lora.LoraLayer):
                # PEFT casts a layer's input to the adapters' dtype (float32) before A; under autocast the
                # matmul casts it back to the same bf16 values, so the cast only costs a saved copy per layer.
                module.cast_input_dtype_enabled = False
        if self.frozen_dtype is not None:
            for module in model.modules():
                if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                    module.to(self.frozen_dtype)
            for param in model.parameters():  # stacked weights (a mixture's experts) are frozen matrices too
                if param.dim() > 2 and not param.requires_grad:
                    param.data = param.data.to(self.frozen_dtype)
        if self.quantized_dtype is not None:  # after the adapters are made: PEFT gives them their base's dtype
            quantized = nf4.quantize_base(model, family, dtype=self.quantized_dtype, device=self.device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        on = f"{', '.join(self.target_names)} ({len(self.module_paths)} linears)" if self.target_names else ""
        if self.parameter_paths:
            names = ", ".join(sorted(set(self.settings.target_parameters)))
            on += f"{' and ' if on else ''}experts' {names} ({len(self.parameter_paths)} stacked weights)"
        self.description += f", on {on}: {trainable / 1e6:.3g}M trainable of {total / 1e6:.4g}M parameters"
        if self.settings.use_dora:
            self.description += "; DoRA's magnitude runs outside torch.compile (PEFT's code there cannot be traced)"
        if self.frozen_dtype is not None:
            self.description += f"; frozen linears stored in {str(self.frozen_dtype).removeprefix('torch.')}"
        if self.quantized_dtype is not None:
            self.description += f"; {quantized}"

    def flops_per_token(self, model: nn.Module, flops: int) -> int:
        # A frozen weight gets no weight gradient: 4 FLOPs per parameter, not 6.
        frozen = flops // 6 - sum(p.numel() for p in model.parameters() if p.requires_grad)
        return flops - 2 * frozen

    def checkpoint_record(self) -> dict[str, Any]:
        """What a checkpoint says about its adapters: the settings and the base they belong to."""
        if self._record is None:  # the fingerprint reads all of the base: once a run
            s = self.settings
            self._record = {
                "method": s.method,
                "r": int(s.r),
                "alpha": float(s.alpha),
                "targets": list(self.target_names),
                "parameters": sorted(set(s.target_parameters)),
                "use_rslora": bool(s.use_rslora),
                "use_dora": bool(s.use_dora),
                "base": base_fingerprint(self.base_dir),
            }
            if self.quantized_dtype is not None:
                self._record["quantize_base"] = (
                    f"{s.quantize_base} from {str(self.quantized_dtype).removeprefix('torch.')}"
                )
        return self._record

    @staticmethod
    def check_record(path: Path, saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> None:
        """Refuse, in one line, a resume whose checkpoint does not fit this run's adapters or base."""
        if saved is None and current is None:
            return
        if saved is None:
            raise ConfigError(
                f"{path} is a full-model checkpoint and this run trains LoRA adapters (peft=lora): resume it with "
                "peft=none, or start the LoRA run fresh"
            )
        if current is None:
            raise ConfigError(
                f"{path} holds LoRA adapters only (peft=lora, base {saved['base']['path']}): resume it with "
                "peft=lora and the same model.pretrained_path"
            )
        quantized = saved.get("quantize_base", "none"), current.get("quantize_base", "none")
        if quantized[0] != quantized[1]:  # another base: the adapters learned to correct this one's rounding
            raise ConfigError(
                f"{path} has adapters trained on the base quantized as {quantized[0]!r} and this run's is "
                f"{quantized[1]!r}: resume with the checkpoint's peft.quantize_base and trainer.autocast_dtype"
            )
        # Every recorded setting shapes the function the adapters compute (alpha scales B @ A), so each is compared;
        # a setting that does not (dropout) is not recorded. A key older checkpoints lack reads as its default.
        for key in sorted((set(saved) | set(current)) - {"base"}):
            was, now = (r.get(key, RECORD_DEFAULTS.get(key)) for r in (saved, current))
            if was != now:
                raise ConfigError(
                    f"{path} has adapters with peft {key}={was!r} and this run asks for {now!r}: resume with the "
                    "checkpoint's peft settings"
                )
        if not same_base(saved["base"], current["base"]):
            raise ConfigError(
                f"{path} was trained on the base {saved['base']['path']} and this run's model.pretrained_path "
                f"{current['base']['path']} is a different checkpoint (fingerprint differs): resume with that base"
            )

    def final_model(
        self, model: nn.Module, *, device: torch.device, dist: distributed.DistInfo, attention: AttentionConfig | None
    ) -> nn.Module | None:
        """The base read from disk again with the adapters merged in (on the CPU; on ``device`` under torchrun,
        where it also serves the sample)."""
        # Under torchrun gathering the sharded adapters is a collective: every rank takes part.
        adapters = distributed.full_state_dict(model, only_trainable=True) if dist.enabled else adapter_tensors(model)
        if dist.rank != 0:
            return None
        self._final_adapters = {name: t.detach().float().cpu() for name, t in adapters.items()}
        merged = merged_model(
            self.family,
            self.base_dir,
            self._final_adapters,
            section=self.settings,
            target_names=self.target_names,
            attention=attention,
            quantized_dtype=self.quantized_dtype,
            quantize_on=device,
        )
        return merged.to(device) if dist.enabled else merged

    def export_extra(self, run_dir: Path, hf_dir: Path) -> str:
        from nemo_lite.training.converters.peft_adapter import base_reference

        # What AutoPeftModelForCausalLM loads the base from: an absolute path or the hub id it came from.
        base_name, revision = base_reference(self.base_path)
        path = save_adapter(
            self._final_adapters,
            run_dir / "adapter",
            section=self.settings,
            target_names=self.target_names,
            target_parameters=[hf_parameter_target(path) for path in self.parameter_paths],
            base_model_name_or_path=base_name,
            revision=revision,
            tokenizer_dir=hf_dir,
        )
        return f"exported the LoRA adapters (PEFT) to {path}"


def lora_config(section: PeftSection, target_modules: list[str], target_parameters: list[str] = (), **extra: Any):
    import peft

    return peft.LoraConfig(
        r=int(section.r),
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        use_rslora=bool(section.use_rslora),
        use_dora=bool(section.use_dora),
        # [], not None, for experts-only adapters: PEFT fills None with its default modules for the model type
        target_modules=list(target_modules),
        target_parameters=list(target_parameters) or None,
        bias="none",
        **extra,
    )


# ---- training checkpoints: the adapters only, with a record of the base -----------------------------


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (the adapters), by nemo_lite's parameter names; what a checkpoint holds."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_magnitude_vector." in name


def base_fingerprint(path: str | Path) -> dict[str, Any]:
    """Where the base came from and a fingerprint of it: sha256 over config.json and each safetensors file's
    name, size and every byte (streamed). A different checkpoint, or the same one with any byte changed, gives
    a different digest. It reads the whole base once a run, saying so for a big one."""
    path = Path(path).expanduser().resolve()
    files = [path / "config.json", *sorted(path.glob("*.safetensors"))]
    total = sum(file.stat().st_size for file in files)
    if total >= FINGERPRINT_NOTICE_BYTES and os.environ.get("RANK", "0") == "0":
        print(f"[nemo_lite] fingerprinting the base {path} ({total / 1e9:.1f} GB, every byte)", file=sys.stderr)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.stat().st_size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            while chunk := f.read(FINGERPRINT_CHUNK):  # hashlib.file_digest is Python 3.11+
                digest.update(chunk)
    return {"path": str(path), "sha256": digest.hexdigest(), "covers": "every byte"}


def same_base(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's record of its base (``saved``) names the base fingerprinted as ``current``.
    Records written before the fingerprint read every byte hold a digest of three 1 MiB samples per file:
    those are compared with the same samples of the base, so such a checkpoint still resumes."""
    if "covers" in saved:
        return saved["sha256"] == current["sha256"]
    return saved["sha256"] == _sampled_digest(Path(current["path"]))


def _sampled_digest(path: Path) -> str:
    """The fingerprint of checkpoints from before ``covers``: config.json whole, and each safetensors file's
    size, header and 1 MiB at the start, middle and end of its data."""
    digest = hashlib.sha256()
    for file in [path / "config.json", *sorted(path.glob("*.safetensors"))]:
        digest.update(file.name.encode())
        size = file.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with open(file, "rb") as f:
            if file.suffix != ".safetensors":
                digest.update(f.read())
                continue
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(header_len))
            data_start, sample = 8 + header_len, 2**20
            for offset in (data_start, (data_start + size) // 2, size - sample):
                f.seek(max(data_start, offset))
                digest.update(f.read(sample))
    return digest.hexdigest()


# ---- export ----------------------------------------------------------------------------------------


def save_adapter(
    adapters: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    section: PeftSection,
    target_names: list[str],
    base_model_name_or_path: str | None,
    tokenizer_dir: str | Path | None = None,
    target_parameters: list[str] = (),
    revision: str | None = None,
) -> Path:
    """Write ``adapters`` (nemo_lite names, :func:`adapter_tensors`) as a PEFT adapter directory that
    ``peft.PeftModel.from_pretrained(transformers_model, path)`` loads, with the tokenizer files of
    ``tokenizer_dir`` (the export's: its chat template is the run's). ``target_parameters``: the adapted stacked
    weights as PEFT names them on the transformers model (:func:`hf_parameter_target`). ``base_model_name_or_path``
    and ``revision``: where ``AutoPeftModelForCausalLM`` finds the base (an absolute path, or a hub id and its
    revision). Atomic (``atomic_directory``)."""
    from nemo_lite.components.models.hf import atomic_directory, save_safetensors, write_tokenizer

    tensors = {hf_adapter_key(name): t.detach().float().cpu().contiguous() for name, t in adapters.items()}
    config = lora_config(
        section,
        target_names,
        sorted(set(target_parameters)),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        revision=revision,
    )
    config.inference_mode = True
    with atomic_directory(path) as tmp:
        config.save_pretrained(str(tmp))
        save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, named=Path(path).expanduser().absolute() / ADAPTER_WEIGHTS)
        write_tokenizer(tmp, None if tokenizer_dir is None else Path(tokenizer_dir))
    return Path(path).expanduser().absolute()


@torch.no_grad()
def merged_model(
    family: Any,
    base_dir: str | Path,
    adapters: Mapping[str, torch.Tensor],
    *,
    section: PeftSection,
    target_names: list[str],
    attention: AttentionConfig | None = None,
    quantized_dtype: torch.dtype | None = None,
    quantize_on: torch.device | str | None = None,
) -> nn.Module:
    """The base read from ``base_dir`` in float32 on the CPU, the adapters added and merged into its weights by
    PEFT (``W + alpha / r * B @ A``): a plain model of the family again, as full fine-tuning leaves it, attending
    as ``attention`` says (None: sdpa, causal). QLoRA (``quantized_dtype``: the dtype its base was quantized from):
    the blocks' linears are first replaced by their NF4 quantization dequantized (made on ``quantize_on``, None: the
    CPU), the weights the adapters were trained on."""
    from peft.tuners.lora import LoraModel

    model = family.load_pretrained(base_dir, attention=attention, dtype=torch.float32, device="cpu")
    if quantized_dtype is not None:
        for path in block_linears(model, family):
            weight = model.get_submodule(path).weight
            weight.copy_(nf4.round_trip(weight, dtype=quantized_dtype, device=quantize_on))
    paths = [path for path, leaf in block_linears(model, family).items() if leaf in target_names]
    weights = [path for path, leaf in block_stacked_weights(model, family).items() if leaf in section.target_parameters]
    tuner = LoraModel(model, lora_config(section, paths, weights), ADAPTER_NAME)
    state = {name: t.detach().float().cpu() for name, t in adapters.items()}
    missing, unexpected = tuner.model.load_state_dict(state, strict=False)
    missing = [name for name in missing if is_adapter_name(name)]
    if missing or unexpected:
        raise ValueError(f"the adapters do not fit {base_dir}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    merged = tuner.merge_and_unload()
    merged.tokenizer_dir = model.tokenizer_dir
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_METHODS",
    "LoraConverter",
    "PeftSection",
    "adapter_tensors",
    "base_fingerprint",
    "block_linears",
    "block_stacked_weights",
    "hf_adapter_key",
    "hf_parameter_target",
    "merged_model",
    "save_adapter",
]
