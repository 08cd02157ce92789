"""A tiny chat checkpoint for the preference tests: the default tokenizer with ChatML turn tokens and a
ChatML-style template, and a random two-layer Llama saved by transformers."""

from __future__ import annotations

from pathlib import Path

import torch

# A ChatML-style template (written for these tests): <|im_end|> ends every turn, a newline after it.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PAIRS_TEXT = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Berlin, I think."},
    {"prompt": "Two plus two makes", "chosen": " four", "rejected": " five or six"},
    {"prompt": "Water boils at", "chosen": " one hundred degrees.", "rejected": " ten."},
]
PAIRS_CHAT = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}],
        "chosen": [{"role": "assistant", "content": "2 plus 3 is 5."}],
        "rejected": [{"role": "assistant", "content": "It is 6."}],
    },
    {
        "prompt": [{"role": "user", "content": "Capital of Peru?"}],
        "chosen": [{"role": "assistant", "content": "Lima."}],
        "rejected": [{"role": "assistant", "content": "The capital of Peru is Quito."}],
    },
    {
        "prompt": [{"role": "user", "content": "How many minutes are in 2 hours?"}],
        "chosen": [{"role": "assistant", "content": "120 minutes."}],
        "rejected": [{"role": "assistant", "content": "200."}],
    },
]


def tiny_chat_checkpoint(path: str | Path, *, seed: int = 0, layers: int = 2) -> Path:
    """Write a random tiny Llama and a chat tokenizer to ``path`` (a Hugging Face directory)."""
    import transformers

    from nemo_lite.components.datasets import build_tokenizer

    path = Path(path)
    tokenizer = build_tokenizer("default")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    config = transformers.LlamaConfig(
        vocab_size=64 * -(-len(tokenizer) // 64),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def perturbed_copy(source: str | Path, dest: str | Path, *, scale: float = 0.05, seed: int = 1) -> Path:
    """``source``'s weights plus seeded noise, saved with its tokenizer at ``dest`` (a policy that differs
    from its reference)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(dest))
    transformers.AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(dest))
    return Path(dest)


def one_row_batch(encoder, records: list[dict], seq_len: int) -> dict[str, torch.Tensor]:
    """All ``records`` (preference pairs, in order) packed into one row of ``seq_len`` tokens, EOS after."""
    from nemo_lite.components.datasets.packing import DocumentPacker, collate_rows

    packer = DocumentPacker(seq_len=seq_len, eos_id=encoder.eos_id, whole_documents=True)
    values = [tuple(r[f] for f in encoder.fields) for r in records]
    for doc in encoder.documents(values, list(range(len(records)))):
        packer.push(doc.ids, trainable=doc.trainable, positions=doc.positions)
    while not packer.rows_ready:
        packer.push([encoder.eos_id], trainable=[0])
    if packer.rows_ready != 1:
        raise ValueError(f"the pairs need more than one row of seq_len={seq_len}")
    return collate_rows([packer.pop_row()], eos_id=encoder.eos_id, answer_ids=True)
