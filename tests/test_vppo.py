"""VinePPO's Monte-Carlo values and step advantages, worked out by hand."""

import pytest
import torch

from tests.conftest import hf_engine, make_algo

from nanovppo.algos.vppo import step_advantages, step_token_bounds, token_ends
from nanovppo.engines.base import Sampling
from tests.fakes import ScriptedEngine, batch, rollouts, source


def test_values_and_advantages_by_hand():
    # Prompt "P:", two responses; the tokens splitter cuts every 2 tokens.
    # Response "abcd": steps "ab" | "cd".  Response "xd": one step.
    engine = ScriptedEngine({
        "P:": ["xx", "aa"],            # V(prompt)   = mean(0, 0.5)          = 0.25
        "P:ab": ["cd", "zz"],          # V("ab")     = mean(1.5, 0.5)        = 1.0
    })
    algo = make_algo("vppo", mc_rollouts=2, splitter="tokens", chunk_tokens=2, max_steps=0,
                     whiten_advantages=False)
    ro = rollouts("P:", ["abcd", "xd"])
    samples, metrics = algo.make_samples(ro, source(engine))
    # one engine call; the prompt's state is shared by both responses, so asked once
    assert len(engine.calls) == 1
    prompts, sampling, budgets = engine.calls[0]
    assert sorted("".join(map(chr, p)) for p in prompts) == ["P:", "P:ab"]
    assert sampling.n == 2
    # each request's budget is what is left of max_new_tokens (8) after its prefix
    assert dict(zip(("".join(map(chr, p)) for p in prompts), budgets)) == {"P:": 8, "P:ab": 6}
    # "abcd": reward 1.5; advantages 1.0 - 0.25 = 0.75 on "ab", 1.5 - 1.0 = 0.5 on "cd"
    assert samples[0].advantage == pytest.approx([0.75, 0.75, 0.5, 0.5])
    # "xd": reward 1.0, a single step: 1.0 - 0.25
    assert samples[1].advantage == pytest.approx([0.75, 0.75])
    assert metrics["train/states_valued"] == 2
    assert metrics["train/continuations"] == 4
    assert 0 <= metrics["perf/value_sampling_s"] <= metrics["perf/value_estimation_s"]


def test_the_prompt_valued_by_the_groups_other_responses():
    """``prompt_value=group``: V(prompt) of a response is the mean score of its group's other
    responses, and the prompt state is not sampled at all.

    Prompt "P:", responses "abcd" (reward 1.5), "xd" (1.0), "zz~" (cut: the penalty, -0.5);
    prompt "Q:", responses "ad" (1.5), "bd" (1.0), "ad". Tokens splitter, 2 tokens a step.
    """
    engine = ScriptedEngine({"P:ab": ["cd", "zz"],   # V("ab")   = mean(1.5, 0.5) = 1.0
                             "P:zz": ["d", "d"]})    # V("zz")   = mean(1.0, 1.0) = 1.0
    algo = make_algo("vppo", mc_rollouts=2, splitter="tokens", chunk_tokens=2, max_steps=0,
                     whiten_advantages=False, unfinished_penalty=-0.5, prompt_value="group")
    ro = batch({"P:": ["abcd", "xd", "zz~"], "Q:": ["ad", "bd", "ad"]})
    samples, metrics = algo.make_samples(ro, source(engine))
    [(prompts, _, _)] = engine.calls
    assert sorted("".join(map(chr, p)) for p in prompts) == ["P:ab", "P:zz"]
    # "abcd": V(prompt) = mean(1.0, -0.5) = 0.25 -> "ab" 1.0 - 0.25, "cd" 1.5 - 1.0
    assert samples[0].advantage == pytest.approx([0.75, 0.75, 0.5, 0.5])
    # "xd": V(prompt) = mean(1.5, -0.5) = 0.5, one step -> 1.0 - 0.5
    assert samples[1].advantage == pytest.approx([0.5, 0.5])
    # "zz~": V(prompt) = mean(1.5, 1.0) = 1.25 -> "zz" 1.0 - 1.25, "~" -0.5 - 1.0
    assert samples[2].advantage == pytest.approx([-0.25, -0.25, -1.5])
    # "ad": V(prompt) = mean(1.0, 1.5) = 1.25 -> 0.25; "bd": mean(1.5, 1.5) -> -0.5
    assert samples[3].advantage == pytest.approx([0.25, 0.25])
    assert samples[4].advantage == pytest.approx([-0.5, -0.5])
    assert samples[5].advantage == pytest.approx([0.25, 0.25])
    assert metrics["train/states_valued"] == 2 and metrics["train/continuations"] == 4
    want = (0.25 + 0.5 + 1.25 + 1.25 + 1.5 + 1.25) / 6
    assert metrics["train/value_prompt_mean"] == pytest.approx(want)


def test_prompt_value_group_needs_a_group():
    from nanovppo.errors import ConfigError

    with pytest.raises(ConfigError, match="group_size of at least 2"):
        make_algo("vppo", prompt_value="group", group_size=1)
    with pytest.raises(ConfigError, match="use mc or group"):
        make_algo("vppo", prompt_value="groups")


def test_continuations_are_scored_with_their_prefix():
    # If a continuation were scored alone, "d" would miss the +0.5 that the prefix's "a"
    # earns: V("ab") would be 1.0, not 1.5.
    engine = ScriptedEngine({"P:": ["ab", "ab"], "P:ab": ["d", "d"]})
    algo = make_algo("vppo", mc_rollouts=2, splitter="tokens", chunk_tokens=2, max_steps=0,
                     whiten_advantages=False)
    samples, _ = algo.make_samples(rollouts("P:", ["abd"]), source(engine))
    # V(prompt) = 0.5 ("ab"), V("ab") = 1.5 ("abd"), reward("abd") = 1.5
    assert samples[0].advantage == pytest.approx([1.0, 1.0, 0.0])


def test_unfinished_continuations_and_responses_score_the_penalty():
    """As the official code does, a continuation (or a response) cut at the token budget
    scores unfinished_penalty, whatever its text would score."""
    engine = ScriptedEngine({"P:": ["ad~", "ad"]})  # "~" marks a cut continuation
    algo = make_algo("vppo", mc_rollouts=2, splitter="tokens", chunk_tokens=8,
                     unfinished_penalty=-0.5, whiten_advantages=False)
    samples, metrics = algo.make_samples(rollouts("P:", ["ad", "ad~"]), source(engine))
    # scores: "ad~" -> -0.5 (its text "ad~" ends in "~" anyway), "ad" -> 1.5; V = 0.5
    # "ad": reward 1.5 -> advantage 1.0 on both tokens; "ad~" (cut): -0.5 - 0.5 = -1.0
    assert samples[0].advantage == pytest.approx([1.0, 1.0])
    assert samples[1].advantage == pytest.approx([-1.0, -1.0, -1.0])
    assert metrics["train/continuation_unfinished_frac"] == 0.5


def test_whitening_over_the_batch_tokens():
    engine = ScriptedEngine({"P:": ["xx", "aa"], "P:ab": ["cd", "zz"]})
    algo = make_algo("vppo", mc_rollouts=2, splitter="tokens", chunk_tokens=2, max_steps=0)
    assert algo.whiten_advantages  # on by default, as in the official configs
    samples, _ = algo.make_samples(rollouts("P:", ["abcd", "xd"]), source(engine))
    # raw: [0.75, 0.75, 0.5, 0.5] and [0.75, 0.75] (test_values_and_advantages_by_hand)
    raw = torch.tensor([0.75, 0.75, 0.5, 0.5, 0.75, 0.75])
    want = (raw - raw.mean()) / raw.std()
    flat = [a for s in samples for a in s.advantage]
    assert flat == pytest.approx(want.tolist(), rel=1e-4)


def test_step_helpers_by_hand():
    assert step_advantages([0.0, 0.5, 2.0]) == [0.5, 1.5]
    # char spans (0,3) (3,5) over tokens ending at 1, 3, 5 -> steps start at tokens 0 and 2
    assert step_token_bounds([(0, 3), (3, 5)], [1, 3, 5]) == [0, 2, 3]
    # a step boundary inside a token moves to the token's end; empty steps vanish
    assert step_token_bounds([(0, 2), (2, 3), (3, 5)], [3, 5]) == [0, 1, 2]


def test_token_ends_from_offsets_and_for_a_tokenization_the_tokenizer_would_not_choose(tiny):
    _, tok = tiny
    text = "We have 12 apples.\nThen 7 more."
    ids = tok(text, add_special_tokens=False).input_ids
    slow = [len(tok.decode(ids[:i + 1])) for i in range(len(ids))]
    assert token_ends(tok, ids) == slow
    # "apples" spelled out one character at a time: re-encoding gives other ids, so the
    # ends come from decoding prefixes, and still match
    odd = tok(" We", add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids(c) for c in "apples"]
    assert token_ends(tok, odd) == [len(tok.decode(odd[:i + 1])) for i in range(len(odd))]
    # an EOS at the end ends where the text ends
    assert token_ends(tok, ids + [tok.eos_token_id]) == slow + [len(text)]


def test_token_level_prefix_continues_the_policys_own_tokens(tiny):
    """Greedy continuations of prompt + first k tokens reproduce the greedy response."""
    model, tok = tiny
    engine = hf_engine(model, tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count: 1 2 3"}],
                                     add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=12)
    [[full]] = engine.generate([prompt_ids], greedy)
    assert len(full.token_ids) == 12
    ks = [1, 5, 9]
    conts = engine.generate([prompt_ids + full.token_ids[:k] for k in ks], greedy,
                            max_new_tokens=[12 - k for k in ks])
    for k, [c] in zip(ks, conts):
        assert full.token_ids[:k] + c.token_ids == full.token_ids
