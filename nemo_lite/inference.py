"""A trained model ready to generate or be evaluated: a checkpoint found from what a user has at hand.

    model, tokenizer = load_for_inference("runs/finetune")              # a run_dir: its hf/ export
    model, tokenizer = load_for_inference("/models/SmolLM2-135M")       # a Hugging Face directory
    model, tokenizer = load_for_inference("HuggingFaceTB/SmolLM2-135M") # a hub id (through the HF cache)
    model, tokenizer = load_for_inference("/models/base", adapter="runs/lora/adapter")  # base + PEFT adapter

and ``recipes/generate.py`` (:class:`GenerateConfig`, :func:`run_generate`): prompts in, text printed and written
as jsonl, with tokens/s (docs/generation.md).

A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as ``run_dir/adapter`` or
PEFT's ``save_pretrained`` writes it) is merged into the base by PEFT (``W + alpha / r * B @ A``, rsLoRA and DoRA as
PEFT merges them); a run_dir trained with
LoRA already holds the merged model in ``hf/``. The model attends with sdpa and causal masks: generation and
evaluation see each prompt whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nemo_lite.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dir(path: str | Path) -> str:
    """``path`` as a Hugging Face directory or hub id: a run_dir's ``hf/`` export, a directory with a
    config.json, or (anything else that does not exist locally) a hub id."""
    local = Path(path).expanduser()
    if (local / "hf" / "config.json").is_file():
        return str(local / "hf")
    if (local / "config.json").is_file():
        return str(local)
    if local.exists():
        raise ConfigError(
            f"{local} is neither a run_dir with an hf/ export nor a Hugging Face directory (no config.json); "
            "pass a run_dir, a directory with config.json + safetensors, or a hub id"
        )
    return str(path)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not supported; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_for_inference(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Any, Any]:
    """The model (eval mode, on ``device`` in ``dtype``) and its Hugging Face tokenizer."""
    import transformers

    from nemo_lite.components.models import AutoModelForCausalLM
    from nemo_lite.components.models.family import family_of_checkpoint, resolve_pretrained

    source = resolve_pretrained(checkpoint_dir(path))
    if adapter is None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device=device)
    else:
        model = _merged_with_adapter(family_of_checkpoint(source), source, Path(adapter).expanduser())
        model = model.to(device=device, dtype=dtype)
    if model.tokenizer_dir is None:
        raise ConfigError(f"{source} has no tokenizer files; save the tokenizer beside config.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model.tokenizer_dir))
    return model.eval(), tokenizer


def _merged_with_adapter(family: Any, base_dir: str | Path, adapter: Path):
    """The base with the PEFT LoRA adapter at ``adapter`` merged in (rsLoRA, DoRA and expert adapters included)."""
    from nemo_lite.components.models.hf import read_config
    from nemo_lite.training.converters.lora import LoraConverter, PeftSection, hf_adapter_key, merged_model
    from nemo_lite.training.converters.peft_adapter import read_adapter, section_of

    found = read_adapter(str(adapter), key="adapter")
    section = section_of(found, PeftSection(method="lora"))
    # The adapter is checked against the base's modules and shapes on a model without data, whose adapter
    # parameters give each PEFT key its nemo_lite name; the merge then reads the base once.
    with torch.device("meta"):
        skeleton = family.model_cls(read_config(base_dir))
    converter = LoraConverter(section, base_path=str(base_dir), adapter=found)
    converter.convert(skeleton, family)
    names = {hf_adapter_key(name): name for name, p in skeleton.named_parameters() if p.requires_grad}
    adapters = {names[key]: tensor for key, tensor in found.tensors.items()}
    return merged_model(family, base_dir, adapters, section=section, target_names=converter.target_names)


# ---- recipes/generate.py ----------------------------------------------------------------------------


@dataclass
class GenerateConfig:
    """python recipes/generate.py checkpoint=PATH_OR_HUB_ID prompt="..." | prompts_file=FILE [key=value ...]"""

    # A run_dir (its hf/ export), a Hugging Face directory or a hub id.
    checkpoint: str = "???"
    # A PEFT LoRA adapter directory merged into the checkpoint.
    adapter: str | None = None
    # One prompt, or a file of them: .txt (one per line) or .jsonl ({"prompt": ...} or {"messages": [...]}).
    prompt: str | None = None
    prompts_file: str | None = None
    # Render each prompt as a user turn through the tokenizer's chat template (None: when it has one).
    chat: bool | None = None
    max_new_tokens: int = 128
    # 0 = greedy; top_k 0 and top_p 1 = no cut.
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    # Stop strings (besides the EOS ids of the checkpoint and its generation_config.json).
    stop: list[str] = field(default_factory=list)
    # Prompts generated together.
    batch_size: int = 8
    # auto = cuda when available, else cpu; dtype auto = bfloat16 on cuda, float32 on cpu.
    device: str = "auto"
    dtype: str = "auto"
    # Compile the decode step and, on cuda, replay it as a CUDA graph.
    compile: bool = False
    # The jsonl written: None = <run_dir>/generations.jsonl for a run_dir, else ./generations.jsonl.
    out: str | None = None


def read_prompts(cfg: GenerateConfig) -> list[Any]:
    """The prompts: strings, or message lists (from a jsonl's "messages")."""
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise ConfigError("pass exactly one of prompt=TEXT or prompts_file=FILE (.txt, one per line, or .jsonl)")
    if cfg.prompt is not None:
        return [cfg.prompt]
    path = Path(cfg.prompts_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts_file={path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
            raise ConfigError(f"{path}:{number}: each line needs a 'prompt' (text) or 'messages' (a conversation)")
        prompts.append(record.get("messages", record.get("prompt")))
    return prompts


def stop_ids(model: Any, tokenizer: Any, source: str) -> tuple[int, ...]:
    """Every EOS id the checkpoint names: its config's, its generation_config.json's (a list, as Llama 3
    Instruct has) and the tokenizer's."""
    ids: list[int] = []
    for value in (model.config.eos_token_id, tokenizer.eos_token_id):
        ids.extend(value if isinstance(value, list | tuple) else [value] if value is not None else [])
    generation_config = Path(source) / "generation_config.json"
    if generation_config.is_file():
        value = json.loads(generation_config.read_text()).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [value] if value is not None else [])
    return tuple(dict.fromkeys(int(i) for i in ids))


def run_generate(cfg: GenerateConfig) -> Path:
    """Generate for every prompt, stream (one prompt) or print each result, write the jsonl; returns its path."""
    import sys

    from nemo_lite.components.models.family import resolve_pretrained
    from nemo_lite.components.models.generate import GenerationConfig, generate_ids

    prompts = read_prompts(cfg)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = parse_dtype(cfg.dtype if cfg.dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32")
    model, tokenizer = load_for_inference(cfg.checkpoint, adapter=cfg.adapter, dtype=dtype, device=device)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if cfg.chat is None else cfg.chat
    if chat and not has_template:
        raise ConfigError(f"chat=true but the tokenizer of {cfg.checkpoint} has no chat template; pass chat=false")
    settings = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
        eos_token_ids=stop_ids(model, tokenizer, resolve_pretrained(checkpoint_dir(cfg.checkpoint))),
        stop_strings=tuple(cfg.stop),
        compile=cfg.compile,
        cuda_graphs=cfg.compile,
    )

    def encode(prompt: Any) -> list[int]:
        if chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if isinstance(prompt, list):
            raise ConfigError("a prompt with 'messages' needs chat=true (and a tokenizer with a chat template)")
        return tokenizer.encode(prompt)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    run_dir = Path(cfg.checkpoint).expanduser()
    out = (
        Path(cfg.out)
        if cfg.out
        else run_dir / "generations.jsonl"
        if (run_dir / "hf").is_dir()
        else Path("generations.jsonl")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    new_tokens, decode_seconds, prefill_seconds = 0, 0.0, 0.0
    with open(out, "w") as f:
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            streamed: list[int] = []

            def stream(step: list[int | None], streamed=streamed) -> None:
                if step[0] is not None:
                    before = decode(streamed)
                    streamed.append(step[0])
                    print(decode(streamed)[len(before) :], end="", flush=True)

            single = len(prompts) == 1
            if single:
                print(decode(encode(batch[0])), end="", flush=True)
            result = generate_ids(
                model, [encode(p) for p in batch], settings, decode=decode, on_tokens=stream if single else None
            )
            for prompt, tokens, reason in zip(batch, result.tokens, result.stop_reasons, strict=True):
                text = decode(tokens)
                for s in cfg.stop:  # the text ends before a stop string, as transformers' users expect
                    text = text.split(s)[0]
                if not single:
                    print(f"--- {prompt if isinstance(prompt, str) else prompt[-1]['content']!r}\n{text}")
                row = {"prompt": prompt, "text": text, "tokens": tokens, "stop_reason": reason}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            new_tokens += sum(len(t) for t in result.tokens)
            decode_seconds += result.decode_seconds
            prefill_seconds += result.prefill_seconds
    if len(prompts) == 1:
        print()
    rate = new_tokens / (prefill_seconds + decode_seconds) if prefill_seconds + decode_seconds > 0 else 0.0
    print(
        f"[nemo_lite] {len(prompts)} prompts, {new_tokens} new tokens, {rate:.1f} tokens/s "
        f"(prefill {prefill_seconds:.3f} s, decode {decode_seconds:.3f} s); wrote {out}",
        file=sys.stderr,
    )
    return out
