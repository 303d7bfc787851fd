"""generate() as users call it, on every transformers release the project supports.

transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`; a model that
knows only one name decodes without state, silently. These tests pass the cache under each name, compare
cached generation with uncached generation, and continue a generation from the cache it returned.
"""

import pytest
import torch
import transformers
from conftest import LAYOUTS, tiny_config
from packaging.version import Version
from transformers import DynamicCache

from hybrid_mamba.modeling import HybridMambaForCausalLM
from hybrid_mamba.modeling.modeling_hybrid_mamba import CACHE_NAME

CACHE_NAMES = ["cache", "past_key_values"]
# Before 5.24, generate() asks a cache given as `past_key_values` for its length, and DynamicCache has none
# when every layer is a Mamba layer (it raises inside transformers): a limit of those releases, not ours.
OLD_GENERATE = Version(transformers.__version__).release < (5, 24)


def skip_unless_generate_can_measure(m, name):
    if OLD_GENERATE and name == "past_key_values" and "attention" not in m.config.layer_types:
        pytest.skip(f"transformers {transformers.__version__}: generate(past_key_values=) needs an attention layer")


def model_for(layout, **kw):
    return HybridMambaForCausalLM(tiny_config(layout, **kw)).eval()


def ids(b=2, t=7, vocab=512, seed=0):
    return torch.randint(3, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def returned_cache(out):
    """The cache a generate()/forward output carries, under the installed transformers' name."""
    cache = getattr(out, CACHE_NAME)
    assert cache is not None
    return cache


def greedy(m, x, n, **kw):
    return m.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def test_output_carries_the_cache_under_the_installed_name():
    import transformers.modeling_outputs as mo

    expected = "cache" if "cache" in mo.CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    assert CACHE_NAME == expected
    m = model_for("hybrid")
    with torch.no_grad():
        out = m(ids(1, 5), use_cache=True)
    assert isinstance(getattr(out, CACHE_NAME), DynamicCache)


@pytest.mark.parametrize("name", CACHE_NAMES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_takes_the_cache_under_either_name(layout, name):
    m, x = model_for(layout), ids(2, 11)
    with torch.no_grad():
        full = m(x, use_cache=False).logits
        first = m(x[:, :7], use_cache=True)
        rest = m(x[:, 7:], use_cache=True, **{name: returned_cache(first)})
        # the base model and the sequence classifier take it too
        base = m.model(x[:, :7], use_cache=True)
        base_rest = m.model(x[:, 7:], use_cache=True, **{name: returned_cache(base)})
    torch.testing.assert_close(rest.logits, full[:, 7:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.lm_head(base_rest.last_hidden_state), full[:, 7:], atol=1e-4, rtol=1e-4)


def test_two_different_caches_are_refused():
    m, x = model_for("hybrid"), ids(1, 5)
    with torch.no_grad(), pytest.raises(ValueError, match="once"):
        m(x, cache=DynamicCache(config=m.config), past_key_values=DynamicCache(config=m.config))


@pytest.mark.parametrize("name", CACHE_NAMES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generate_with_a_given_cache_equals_uncached(layout, name):
    m, x = model_for(layout), ids(2, 7)
    skip_unless_generate_can_measure(m, name)
    with torch.no_grad():
        reference = greedy(m, x, 8, use_cache=False)
        given = greedy(m, x, 8, **{name: DynamicCache(config=m.config)})
        default = greedy(m, x, 8)
    assert given.tolist() == reference.tolist()
    assert default.tolist() == reference.tolist()


@pytest.mark.parametrize("name", CACHE_NAMES)
def test_beam_search_with_a_given_cache_equals_uncached(name):
    m, x = model_for("hybrid"), ids(2, 6)
    kw = dict(num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        reference = greedy(m, x, 6, use_cache=False, **kw)
        given = greedy(m, x, 6, **kw, **{name: DynamicCache(config=m.config)})
    assert given.tolist() == reference.tolist()


@pytest.mark.parametrize("name", CACHE_NAMES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_continuing_from_the_returned_cache_equals_one_generate(layout, name):
    """generate(), then generate() again from its sequences and cache: exactly one uninterrupted generate()."""
    m, x = model_for(layout), ids(2, 6)
    skip_unless_generate_can_measure(m, name)
    with torch.no_grad():
        whole = greedy(m, x, 10)
        first = greedy(m, x, 4, return_dict_in_generate=True)
        cache = returned_cache(first)
        # the cache holds the prompt and all generated tokens but the last, which the next call feeds
        if "attention" in m.config.layer_types:
            assert cache.get_seq_length() == x.shape[1] + 4 - 1
        second = greedy(m, first.sequences, 6, **{name: cache})
    assert first.sequences.tolist() == whole[:, :10].tolist()
    assert second.tolist() == whole.tolist()


def test_generate_from_inputs_embeds():
    m, x = model_for("hybrid"), ids(2, 7)
    with torch.no_grad():
        from_ids = greedy(m, x, 6)
        from_embeds = greedy(m, None, 6, inputs_embeds=m.get_input_embeddings()(x))
        # with embeddings only, generate() returns the new tokens
        assert from_embeds.tolist() == from_ids[:, 7:].tolist()
        # ids and embeddings together: the embeddings feed the prompt, the ids are returned with it
        both = greedy(m, x, 6, inputs_embeds=m.get_input_embeddings()(x))
    assert both.tolist() == from_ids.tolist()


@pytest.mark.parametrize("layout", ["hybrid", "mamba1", "attention"])
def test_dict_outputs_on_the_cached_path(layout):
    """return_dict_in_generate with scores, logits, attentions and hidden states, cached; the logits are
    those of a full forward over the final sequence."""
    m, x = model_for(layout, attn_implementation="eager"), ids(2, 6)
    n, n_layers = 5, m.config.num_hidden_layers
    n_attn = m.config.layer_types.count("attention")
    with torch.no_grad():
        out = greedy(
            m,
            x,
            n,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            output_attentions=n_attn > 0,
            output_hidden_states=True,
        )
        full = m(out.sequences, use_cache=False).logits
    assert out.sequences.shape == (2, 6 + n)
    assert len(out.scores) == len(out.logits) == n
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, 5 + step], atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.stack(out.scores).argmax(-1).T, out.sequences[:, 6:])
    assert len(out.hidden_states) == n and len(out.hidden_states[0]) == n_layers + 1
    assert out.hidden_states[0][0].shape[1] == 6 and out.hidden_states[1][0].shape[1] == 1  # prompt, then one token
    if n_attn:
        assert len(out.attentions) == n and len(out.attentions[0]) == n_attn
        first, later = out.attentions[0][0], out.attentions[-1][0]
        heads = m.config.num_attention_heads
        assert first.shape == (2, heads, 6, 6) and later.shape == (2, heads, 1, 6 + n - 1)
        torch.testing.assert_close(later.sum(-1), torch.ones_like(later.sum(-1)))
    assert isinstance(returned_cache(out), DynamicCache)


def test_decode_step_in_the_cache_buffer_equals_the_out_of_place_step():
    """Without grad the Mamba-2 step updates the cache's state buffer in place; with grad it builds a new tensor.
    Both give the same logits and states over several steps."""
    torch.manual_seed(0)
    m = model_for("hybrid")
    x = ids(b=3, t=9)
    runs = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = m(input_ids=x, use_cache=True)
            cache = returned_cache(out)
            logits, tok = [], out.logits[:, -1:].argmax(-1)
            for _ in range(4):
                out = m(input_ids=tok, **{CACHE_NAME: cache}, use_cache=True)
                logits.append(out.logits.detach())
                tok = out.logits[:, -1:].argmax(-1)
            runs.append((torch.cat(logits, 1), cache.get_recurrent_state(0).detach().clone()))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-5)
