"""The hf rollout engine: log-probs, stopping, seeding and weight updates."""

import copy

import torch

from nanovppo.engines.base import Sampling
from tests.conftest import hf_engine
from tests.test_logprobs import naive_logprobs

PROMPTS = [[1, 5, 9, 200, 31], [7, 8]]


def test_logprobs_equal_a_separate_forward_pass(tiny):
    model, tok = tiny
    engine = hf_engine(model, tok, seed=0)
    groups = engine.generate(PROMPTS, Sampling(n=3, temperature=0.8, max_new_tokens=12))
    assert [len(g) for g in groups] == [3, 3]
    with torch.no_grad():
        for prompt, group in zip(PROMPTS, groups):
            for c in group:
                assert c.prompt_ids == prompt
                assert len(c.logprobs) == len(c.token_ids) > 0
                want, _ = naive_logprobs(model, prompt, c.token_ids, temperature=0.8)
                torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)
                # cut at the budget, or ended by EOS before it (no stop strings here)
                assert c.finish_reason == ("length" if len(c.token_ids) == 12 else "stop")


def test_same_seed_same_samples_and_different_seed_differs(tiny):
    model, tok = tiny
    sp = Sampling(n=4, temperature=1.0, max_new_tokens=10)
    a = hf_engine(model, tok, seed=1).generate(PROMPTS, sp)
    b = hf_engine(model, tok, seed=1).generate(PROMPTS, sp)
    c = hf_engine(model, tok, seed=2).generate(PROMPTS, sp)
    ids = lambda gs: [x.token_ids for g in gs for x in g]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_batches_of_any_size_give_the_same_samples_under_greedy(tiny):
    model, tok = tiny
    sp = Sampling(n=2, temperature=0.0, max_new_tokens=8)
    big = hf_engine(model, tok, max_batch=64).generate(PROMPTS, sp)
    small = hf_engine(model, tok, max_batch=2).generate(PROMPTS, sp)
    assert [x.token_ids for g in big for x in g] == [x.token_ids for g in small for x in g]
    # greedy: both samples of a prompt agree
    assert big[0][0].token_ids == big[0][1].token_ids



def test_stop_string_and_eos_end_a_completion(tiny):
    model, tok = tiny
    script = tok("ab</answer> tail", add_special_tokens=False).input_ids + [tok.eos_token_id]
    forced = copy.deepcopy(model)
    vocab = forced.config.vocab_size

    # A model whose next token is a fixed function of the sequence length: the script.
    class Forced(torch.nn.Module):
        def __init__(self, inner, start):
            super().__init__()
            self.inner, self.start = inner, start
            self.config, self.generation_config = inner.config, inner.generation_config

        def forward(self, input_ids, attention_mask, past_key_values=None, **kw):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                             past_key_values=past_key_values, **kw)
            done = attention_mask.shape[1] - self.start
            logits = torch.full((input_ids.shape[0], 1, vocab), -1e9)
            logits[:, 0, script[min(done, len(script) - 1)]] = 0.0
            out.logits = logits
            return out

    prompt = [4, 5, 6]
    engine = hf_engine(Forced(forced, len(prompt)), tok)
    [[c]] = engine.generate([prompt], Sampling(n=1, max_new_tokens=30, stop=("</answer>",)))
    assert c.finish_reason == "stop"
    assert c.text.endswith("</answer>") and "tail" not in c.text
    [[c]] = engine.generate([prompt], Sampling(n=1, max_new_tokens=30))
    assert c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_token_id
    assert c.text == "ab</answer> tail"
    [[c]] = engine.generate([prompt], Sampling(n=1, max_new_tokens=2))
    assert c.finish_reason == "length" and len(c.token_ids) == 2


def test_a_bf16_copy_follows_weight_updates(tiny):
    model, tok = tiny
    policy = copy.deepcopy(model)
    engine = hf_engine(policy, tok, dtype="bfloat16")
    assert not engine.shares_policy
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    name, param = next(iter(policy.named_parameters()))
    before = dict(engine.model.named_parameters())[name].float().clone()
    engine.update_weights(policy.named_parameters())
    after = dict(engine.model.named_parameters())[name].float()
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, param.detach(), atol=1e-2, rtol=1e-2)
    shared = hf_engine(policy, tok, dtype="float32")
    assert shared.shares_policy and shared.model is policy
