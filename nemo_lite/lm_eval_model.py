"""lm-evaluation-harness over nemo_lite models: :class:`NemoLiteLM`, registered as lm-eval's model ``nemo_lite``.

    from nemo_lite.lm_eval_model import NemoLiteLM, evaluate

    lm = NemoLiteLM("runs/finetune")                      # a run_dir, an HF directory or a hub id (+ adapter=)
    results = evaluate(lm, ["hellaswag"], limit=100)     # lm-eval's results dict

or from the command line, ``python recipes/evaluate.py checkpoint=runs/finetune tasks=[hellaswag]``
(docs/evaluation.md). It needs the ``eval`` extra (``pip install nemo_lite[eval]``: lm-eval).

The three request types are scored as lm-eval's own Hugging Face class (``HFLM``) scores them, so a task gives the
same numbers on the same checkpoint: the same tokenization of context and continuation (lm-eval's ``TemplateLM``),
the same left truncation to ``max_length`` and rolling windows; the model sees every sequence with a causal mask
(never split at an EOS inside it), and ``generate_until`` runs over nemo_lite's KV cache
(:mod:`nemo_lite.components.models.generate`), greedy unless the task samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text

from nemo_lite.components.models.generate import GenerationConfig, causal_view, generate_ids
from nemo_lite.inference import load_for_inference, parse_dtype

# nemo_lite's offline tasks (a task YAML over a local jsonl each): nemo_lite_arithmetic_mc (multiple choice),
# nemo_lite_arithmetic_ppl (rolling perplexity), nemo_lite_arithmetic_gen (generation).
SHIPPED_TASKS = Path(__file__).resolve().parent / "assets" / "eval_tasks"


@register_model("nemo_lite")
class NemoLiteLM(TemplateLM):
    """A nemo_lite model as an lm-eval ``LM``.

    Args:
        pretrained: a run_dir, a Hugging Face directory or a hub id (or pass ``model`` and ``tokenizer``).
        adapter: a PEFT LoRA adapter directory merged into ``pretrained``.
        dtype: float32 | bfloat16 | float16.
        device: where the model runs ("cpu", "cuda").
        batch_size: sequences per forward (and prompts per generation batch).
        max_length: the longest sequence scored; default the model's ``max_position_embeddings``.
        max_gen_toks: new tokens of ``generate_until`` when the task does not say.
        add_bos_token: None: the tokenizer's own rule; True/False: force it (as HFLM's argument).
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        adapter: str | Path | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
    ) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("NemoLiteLM needs pretrained= (a run_dir, an HF directory or a hub id) or model=")
            model, tokenizer = load_for_inference(pretrained, adapter=adapter, dtype=parse_dtype(dtype), device=device)
        if tokenizer is None:
            raise ValueError("NemoLiteLM(model=...) needs tokenizer= too")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = model.embed_tokens.weight.device
        self._batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token

    # ---- what lm-eval asks of a model ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special: dict[str, bool] = {}
        if add_special_tokens is not None:
            special["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            special["add_special_tokens"] = self.add_bos_token
        # a string that already starts with the BOS gets no second one
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each ``(key, context_ids, continuation_ids)`` -> (log-probability of the continuation after the
        context, whether it is the greedy continuation). Sequences longer than ``max_length + 1`` lose their
        oldest tokens."""
        inputs, spans = [], []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            inputs.append(whole[:-1])
            spans.append((len(whole) - 1 - len(continuation), list(continuation)))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            longest = max(len(inputs[i]) for i in chunk)
            ids_BS = torch.zeros(len(chunk), longest, dtype=torch.long)
            for row, i in enumerate(chunk):  # right padding: a causal mask keeps it out of every real position
                ids_BS[row, : len(inputs[i])] = torch.tensor(inputs[i])
            ids_BS = ids_BS.to(self._device)
            mask = causal_view(self.model, len(chunk), longest, self._device)
            logprobs_BSV = F.log_softmax(self.model(ids_BS, attention_mask=mask).float(), dim=-1)
            for row, i in enumerate(chunk):
                first, continuation = spans[i]
                target = torch.tensor(continuation, device=self._device)
                logprobs_CV = logprobs_BSV[row, first : first + len(continuation)]
                score = logprobs_CV.gather(1, target[:, None]).sum().item()
                greedy = bool((logprobs_CV.argmax(dim=-1) == target).all())
                results[i] = (score, greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, scored in disjoint windows of ``max_length`` tokens, each
        window seeing the tokens before it up to ``max_length`` (lm-eval's rolling windows)."""
        scores = []
        for (string,) in [request.args for request in requests]:
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            window_scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            scores.append(sum(score for score, _ in window_scores))
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop sequence of the task (or the EOS), batched by generation
        settings; the returned text is cut before the first stop sequence."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items(), key=str)), []).append(i)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            config = GenerationConfig(
                max_new_tokens=max_gen_toks,
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
                seed=kwargs.get("seed"),
                eos_token_ids=(self.eot_token_id,),
                stop_strings=tuple(s for s in until if s),
            )
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [self._context_ids(requests[i].args[0], max_gen_toks) for i in chunk]
                out = generate_ids(self.model, prompts, config, decode=self.tok_decode)
                for i, tokens in zip(chunk, out.tokens, strict=True):
                    text = postprocess_generated_text(
                        generation=self.tok_decode(tokens), stop=until, think_end_token=None
                    )
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _context_ids(self, context: str, max_gen_toks: int) -> list[int]:
        """A context as HFLM encodes it for generation (left-truncated to leave room for the new tokens)."""
        special = {}
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        ids = self.tokenizer(context, **special)["input_ids"]
        room = self.max_length - max_gen_toks
        if room <= 0:
            raise ValueError(
                f"max_gen_toks={max_gen_toks} leaves no room for a context within max_length={self.max_length}"
            )
        return ids[-room:]


def evaluate(lm: NemoLiteLM, tasks: list[str], *, task_dirs: list[str] | None = None, **kwargs) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``tasks``: lm-eval's own, nemo_lite's offline ones (:data:`SHIPPED_TASKS`),
    or tasks in YAML files under ``task_dirs``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(SHIPPED_TASKS), *(task_dirs or [])])
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, **kwargs)
