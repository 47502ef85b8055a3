"""lm-evaluation-harness over a linear_moe checkpoint: an ``lm_eval`` model (``TemplateLM``)
around ``linear_moe.inference.CausalLM``.

    from lm_eval_adapter import LinearMoELM
    lm = LinearMoELM.from_checkpoint("checkpoints/run", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Log-likelihoods (multiple choice, perplexity) are one forward per batch of requests, right-padded;
generation is greedy (``until`` strings and ``max_gen_toks`` from the task). One process.
"""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from linear_moe.inference import CausalLM

DEFAULT_MAX_GEN_TOKS = 256


class LinearMoELM(TemplateLM):
    def __init__(self, lm: CausalLM, batch_size: int = 8):
        super().__init__()
        self.lm, self.batch_size = lm, batch_size

    @classmethod
    def from_checkpoint(cls, load_dir: str, iteration: int | None = None,
                        tokenizer_path: str | None = None, batch_size: int = 8, device=None):
        return cls(CausalLM.from_checkpoint(load_dir, iteration, tokenizer_path, device),
                   batch_size)

    @property
    def eot_token_id(self) -> int:
        return self.lm.eod

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.lm.encode(string)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation), context ids, continuation ids)."""
        return self.lm.continuation_logprobs([(ctx, cont) for _, ctx, cont in requests],
                                             self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """Each text's total log-likelihood over windows of max_length tokens, the first
        conditioned on the eod (lm-eval's disjoint rolling windows)."""
        results = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self.lm.continuation_logprobs(windows, self.batch_size)
            results.append(sum(score for score, _ in scores))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample"):
                raise ValueError("only greedy generation is supported; set do_sample: false in "
                                 "the task's generation_kwargs")
            context_ids = self.tok_encode(context) or [self.eot_token_id]
            text = self.lm.decode(self.lm.generate(context_ids, max_new, until))
            for stop in until:  # the text up to the first stop string, as lm-eval's HF model
                text = text.split(stop)[0]
            out.append(text)
        return out
