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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.errors import ConfigError
from nemo_lite.training import distributed
from nemo_lite.training.converters.base import ModelConverter, register_converter

ADAPTER_NAME = "default"  # PEFT's adapter name inside the layers; not part of any exported key
ALL_LINEAR = "all-linear"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_METHODS = ("none", "lora")


@dataclass
class PeftSection:
    """The ``peft:`` config section (configs/peft/*.yaml)."""

    # "none" (every weight trains) or "lora" (adapters through PEFT; configs/peft/lora.yaml, docs/finetuning.md).
    method: str = "none"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # Hugging Face module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or all-linear.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Stacked expert weights of a mixture of experts (gate_up_proj, down_proj), adapted per expert through PEFT's
    # target_parameters; [] adapts none.
    target_parameters: list[str] = field(default_factory=list)
    # rsLoRA: the update is scaled by alpha / sqrt(r) instead of alpha / r.
    use_rslora: bool = False
    # DoRA: each adapted weight becomes a trained magnitude per output row times the direction of W + B A.
    use_dora: bool = False
    # A PEFT LoRA adapter to train on from: a local directory (adapter_config.json + adapter_model.safetensors) or a
    # hub id (org/name[@revision]). Its settings are the run's (docs/finetuning.md, "Bring your own adapter").
    adapter_path: str | None = None


def block_stacked_weights(model: nn.Module, family: Any) -> dict[str, str]:
    """Every parameter stacked over experts (``[E, ...]``, three dimensions) inside the family's decoder blocks:
    full parameter path -> leaf name (``gate_up_proj``)."""
    in_blocks = {id(p) for block in family.blocks(model) for p in block.parameters()}
    return {
        name: name.rsplit(".", 1)[-1]
        for name, param in model.named_parameters()
        if param.dim() == 3 and id(param) in in_blocks
    }


def block_linears(model: nn.Module, family: Any) -> dict[str, str]:
    """Every ``nn.Linear`` inside the family's decoder blocks: full module path -> leaf name (``q_proj``)."""
    in_blocks = {id(m) for block in family.blocks(model) for m in block.modules()}
    return {
        name: name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) in in_blocks
    }


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

    @classmethod
    def enabled(cls, section: PeftSection) -> bool:
        return section.method != "none"

    @staticmethod
    def check_section(peft: PeftSection) -> None:
        """The ``peft`` section's own values, in one line each."""
        if peft.method not in PEFT_METHODS:
            raise ConfigError(f"peft.method={peft.method!r} is not valid; choose one of: {', '.join(PEFT_METHODS)}")
        if peft.method == "none":
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
        base_path = cfg.model.pretrained_path
        return cls(section, frozen_dtype=autocast_dtype, base_dir=pretrained_dir, base_path=base_path, adapter=adapter)

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

    def flops_per_token(self, model: nn.Module, flops: int) -> int:
        # A frozen weight gets no weight gradient: 4 FLOPs per parameter, not 6.
        frozen = flops // 6 - sum(p.numel() for p in model.parameters() if p.requires_grad)
        return flops - 2 * frozen

    def checkpoint_record(self) -> dict[str, Any]:
        """What a checkpoint says about its adapters: the settings and the base they belong to."""
        if self._record is None:  # the fingerprint reads a few MiB of the base: once a run
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
        # Checkpoints from before target_parameters, rsLoRA and DoRA lack those keys: they had none of them.
        absent_as = {"r": None, "targets": None, "parameters": [], "use_rslora": False, "use_dora": False}
        for key, absent in absent_as.items():
            if saved.get(key, absent) != current.get(key, absent):
                raise ConfigError(
                    f"{path} has adapters with peft {key}={saved.get(key, absent)} and this run asks for "
                    f"{current.get(key, absent)}: resume with the checkpoint's peft settings"
                )
        if saved["base"]["sha256"] != current["base"]["sha256"]:
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
    """Where the base came from and a cheap fingerprint of it: sha256 of config.json, and of each
    safetensors file's size, header and three 1 MiB samples of its data (a few MiB read whatever the
    model's size). A different checkpoint, or the same one changed, gives a different digest."""
    path = Path(path).expanduser().resolve()
    digest = hashlib.sha256()
    files = sorted(path.glob("*.safetensors"))
    for file in [path / "config.json", *files]:
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
    return {"path": str(path), "sha256": digest.hexdigest()}


# ---- export ----------------------------------------------------------------------------------------


def hf_module_path(module: str) -> str:
    """``layers.0.attention.q_proj`` -> ``model.layers.0.self_attn.q_proj``: the Hugging Face path of one of our
    modules, through the parameter-name table (any parameter under it gives the module's prefix)."""
    from nemo_lite.components.models.hf import HF_KEY_MAP, to_hf_key

    template = re.sub(r"^layers\.\d+\.", "layers.{i}.", module) + "."
    for key in HF_KEY_MAP:
        if key.startswith(template) and "." not in key[len(template) :]:
            leaf = key[len(template) :]
            return to_hf_key(f"{module}.{leaf}").removesuffix(f".{leaf}")
    raise KeyError(f"module {module!r} has no parameter in HF_KEY_MAP")


def hf_parameter_target(path: str) -> str:
    """``layers.0.mlp.experts.gate_up_proj`` -> ``mlp.experts.gate_up_proj``: how PEFT's ``target_parameters``
    names a stacked weight of a transformers model (the path inside a decoder layer, as PEFT matches suffixes)."""
    module, leaf = path.rsplit(".", 1)
    return re.sub(r"^model\.layers\.\d+\.", "", hf_module_path(module)) + f".{leaf}"


def hf_adapter_key(name: str) -> str:
    """``layers.0.attention.q_proj.lora_A.default.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.weight``: the key PEFT writes for a transformers model (adapter name dropped). Adapters on stacked
    weights keep PEFT's nesting (``mlp.experts.base_layer.lora_A``: a second weight of one module wraps the
    first's wrapper). DoRA's magnitude (``...q_proj.lora_magnitude_vector.default.weight``) is
    ``...q_proj.lora_magnitude_vector``, as PEFT saves it."""
    module, rest = name.split(".lora_", 1)
    which, adapter, tensor = rest.split(".")
    if adapter != ADAPTER_NAME:
        raise KeyError(f"{name!r} belongs to adapter {adapter!r}, not {ADAPTER_NAME!r}")
    wrappers = ""
    while module.endswith(".base_layer"):
        module, wrappers = module.removesuffix(".base_layer"), wrappers + ".base_layer"
    if which == "magnitude_vector":
        return f"base_model.model.{hf_module_path(module)}{wrappers}.lora_magnitude_vector"
    return f"base_model.model.{hf_module_path(module)}{wrappers}.lora_{which}.{tensor}"


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
) -> nn.Module:
    """The base read from ``base_dir`` in float32 on the CPU, the adapters added and merged into its weights by
    PEFT (``W + alpha / r * B @ A``): a plain model of the family again, as full fine-tuning leaves it, attending
    as ``attention`` says (None: sdpa, causal)."""
    from peft.tuners.lora import LoraModel

    model = family.load_pretrained(base_dir, attention=attention, dtype=torch.float32, device="cpu")
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
