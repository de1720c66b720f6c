"""The autoregressive transformer family: causality, the likelihood units on hand-made
cases, top-k/top-p filtering, KV-cache decoding against uncached decoding, gradient
checkpointing, the real specs' sizes, and that it learns the bundled tales."""

import math

import numpy as np
import pytest
import torch

from gentrain.data.index import load_index
from gentrain.data.pack import pack_source
from gentrain.data.pipeline import eval_batches
from gentrain.data.texts import TINYTALES_SEQ_LEN, tinytales
from gentrain.engine import Engine, build_modules
from gentrain.registry import DataInfo, SampleRequest, get_job_type
from gentrain.schema import SpecError
from gentrain.validation import load_spec
from gentrain.visual import save_samples, token_text
from gentrain_jobs.transformer import (JOB, TransformerConfig, TransformerSampler, build, count_parameters,
                                       evaluate, sample, summarize)
from gentrain_jobs.transformer.likelihood import token_nll
from gentrain_jobs.transformer.model import DecoderLM, KVCache
from gentrain_jobs.transformer.sampling import draw, filtered_probabilities, generate

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(positions: str = "learned", vocab: int = 256, context: int = 32, norm: str = "layernorm",
         seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(vocab, context, layers=2, d_model=32, heads=4, positions=positions, norm=norm).double().eval()


# -- causality --------------------------------------------------------------------------
@pytest.mark.parametrize("positions, norm", [("learned", "layernorm"), ("rotary", "rmsnorm")])
def test_changing_token_t_never_changes_logits_before_t(positions, norm):
    model = tiny(positions, norm=norm)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (3, 24), generator=generator)
    with torch.no_grad():
        reference = model(tokens)
        for t in (0, 5, 23):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.randint(0, 255, (3,), generator=generator)) % 256
            logits = model(changed)
            assert torch.equal(logits[:, :t], reference[:, :t])  # exactly, bit for bit
            # ... and the test can fail: every position from t on sees the change.
            differs = (logits[:, t:] - reference[:, t:]).abs().amax(-1)
            assert (differs > 1e-9).all(), (t, differs)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cached_forward_equals_the_full_forward(positions):
    model = tiny(positions)
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache()
        pieces = [model(tokens[:, :7], cache)] + [model(tokens[:, i:i + 1], cache) for i in range(7, 20)]
        # a block of several new tokens after cached ones (the explicit-mask path)
        other = KVCache()
        blocks = [model(tokens[:, :5], other), model(tokens[:, 5:12], other), model(tokens[:, 12:], other)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(blocks, 1), full, rtol=0, atol=1e-12)
    assert cache.length == other.length == 20


def test_learned_positions_refuse_sequences_past_the_context():
    with pytest.raises(ValueError, match="exceed the learned positions' context 32"):
        tiny("learned")(torch.zeros(1, 33, dtype=torch.int64))
    tiny("rotary")(torch.zeros(1, 33, dtype=torch.int64))  # rotary angles go on


# -- likelihood units on hand-made cases -----------------------------------------------
class FixedLogits(torch.nn.Module):
    """Returns the logits it was given (a hand-made predictive distribution)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.vocab_size = logits, logits.shape[-1]

    def forward(self, tokens):
        return self.logits


def test_perplexity_is_exp_of_the_mean_nll_in_nats_on_a_hand_made_case():
    # Two predictions over 256 byte values: the true next byte gets probability 1/4, then 1/2
    # (logit ln 85 against 255 zeros: 85 / (85 + 255) = 1/4; ln 255: 255 / 510 = 1/2).
    tokens = torch.tensor([[10, 97, 98]])
    logits = torch.zeros(1, 3, 256, dtype=torch.float64)
    logits[0, 0, 97] = math.log(85)
    logits[0, 1, 98] = math.log(255)
    logits[0, 2, 7] = 100.0  # the last position predicts nothing in the sample: ignored
    expected_nll = (math.log(4) + math.log(2)) / 2  # 1.5 ln 2 nats per token
    nll = token_nll(logits, tokens)
    torch.testing.assert_close(nll, torch.tensor([[math.log(4), math.log(2)]], dtype=torch.float32))
    metrics = evaluate({"transformer": FixedLogits(logits)}, TransformerConfig(), {"tokens": tokens}, None)
    assert metrics["nll"] == pytest.approx(expected_nll, rel=1e-6)
    assert metrics["bits_per_byte"] == pytest.approx(1.5, rel=1e-6)  # (2 + 1) bits over 2 bytes
    assert summarize(metrics)["perplexity"] == pytest.approx(2 ** 1.5, rel=1e-6)  # exp(1.5 ln 2)


def test_perplexity_over_batches_is_exp_of_the_overall_mean_not_a_mean_of_perplexities():
    # Batch means NLL ln 2 and ln 8 (equal sizes): mean ln 4, so perplexity 4, not (2 + 8) / 2 = 5.
    means = {"nll": (math.log(2) + math.log(8)) / 2}
    assert summarize(means)["perplexity"] == pytest.approx(4.0)
    assert JOB.likelihoods == {"nll": "nats", "bits_per_byte": "bits/byte", "perplexity": "perplexity"}


def test_a_non_byte_vocabulary_reports_no_bits_per_byte():
    logits = torch.zeros(1, 4, 1000)
    metrics = evaluate({"transformer": FixedLogits(logits)}, TransformerConfig(),
                       {"tokens": torch.zeros(1, 4, dtype=torch.int64)}, None)
    assert metrics == {"nll": pytest.approx(math.log(1000), rel=1e-6)}


# -- top-k, top-p, temperature, the draw -----------------------------------------------
P = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64)


def expected(*values) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float64)


def test_top_k_keeps_the_k_most_likely_renormalised():
    got = filtered_probabilities(P.log(), top_k=2)
    torch.testing.assert_close(got, expected(0.5, 0.2, 0, 0, 0) / 0.7, rtol=1e-6, atol=1e-7)


def test_top_p_keeps_the_smallest_most_likely_set_reaching_p():
    # cumulative 0.5, 0.7, 0.85, ...: reaching 0.75 takes the three most likely tokens
    got = filtered_probabilities(P.log(), top_p=0.75)
    torch.testing.assert_close(got, expected(0.5, 0.2, 0.15, 0, 0) / 0.85, rtol=1e-6, atol=1e-7)
    # 0.4 is reached by the first token alone, which is always kept
    torch.testing.assert_close(filtered_probabilities(P.log(), top_p=0.4), expected(1.0, 0, 0, 0, 0))
    # in any order of the vocabulary
    order = torch.tensor([3, 0, 4, 2, 1])
    shuffled = filtered_probabilities(P.log()[:, order], top_p=0.75)
    torch.testing.assert_close(shuffled, (expected(0.5, 0.2, 0.15, 0, 0) / 0.85)[:, order],
                               rtol=1e-6, atol=1e-7)


def test_top_p_applies_after_top_k_and_temperature():
    # top 3 renormalised: 0.588, 0.235, 0.176; reaching 0.6 takes the first two
    got = filtered_probabilities(P.log(), top_k=3, top_p=0.6)
    torch.testing.assert_close(got, expected(0.5, 0.2, 0, 0, 0) / 0.7, rtol=1e-6, atol=1e-7)
    hot = filtered_probabilities(P.log(), temperature=2.0)  # p^(1/2), renormalised
    torch.testing.assert_close(hot, P.sqrt() / P.sqrt().sum(), rtol=1e-6, atol=1e-7)
    greedy = filtered_probabilities(P.log()[:, [2, 0, 1]], temperature=0)
    torch.testing.assert_close(greedy, expected(0.0, 1.0, 0.0))


def test_draw_is_the_inverse_cdf_and_never_picks_a_filtered_token():
    probabilities = torch.tensor([[0.25, 0.0, 0.75]] * 4)
    tokens = draw(probabilities, torch.tensor([0.0, 0.2499, 0.25, 0.999999], dtype=torch.float64))
    assert tokens.tolist() == [0, 0, 2, 2]
    # frequencies of many draws match the filtered distribution
    generator = torch.Generator().manual_seed(0)
    filtered = filtered_probabilities(P.log(), top_k=3).expand(40000, -1)
    counts = torch.bincount(draw(filtered, torch.rand(40000, generator=generator, dtype=torch.float64)),
                            minlength=5).double() / 40000
    torch.testing.assert_close(counts, filtered[0], rtol=0, atol=0.01)
    assert counts[3] == 0 and counts[4] == 0


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 20, 1.0), (1.2, 0, 0.9),
                                                       (0.9, 40, 0.8), (0.0, 0, 1.0)])
def test_kv_cache_sampling_equals_uncached_sampling_token_for_token(positions, temperature, top_k, top_p):
    model = tiny(positions, context=40)
    prompt = torch.tensor([[72, 105, 32]] * 3)
    drawn = {}
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(7)
        drawn[use_cache] = generate(model, prompt, 30, generator, temperature, top_k, top_p, use_cache=use_cache)
    assert drawn[True].shape == (3, 33)
    assert torch.equal(drawn[True], drawn[False])
    assert torch.equal(drawn[True][:, :3], prompt)
    if temperature > 0:  # the three samples differ: randomness is used, and per sample
        assert len({tuple(row) for row in drawn[True].tolist()}) == 3


def test_the_family_sample_uses_the_settings_and_the_cache_changes_nothing():
    model = tiny("rotary", context=24)
    settings = TransformerSampler(temperature=0.9, top_k=50, top_p=0.95, prompt="ab", length=10)
    cached = sample({"transformer": model}, TransformerConfig(), SampleRequest(4, torch.Generator().manual_seed(3),
                                                                               settings))
    plain = sample({"transformer": model}, TransformerConfig(),
                   SampleRequest(4, torch.Generator().manual_seed(3),
                                 TransformerSampler(temperature=0.9, top_k=50, top_p=0.95, prompt="ab", length=10,
                                                    cache=False)))
    assert cached.dtype == torch.int64 and cached.shape == (4, 12)
    assert torch.equal(cached, plain) and cached[:, :2].tolist() == [[97, 98]] * 4
    filled = sample({"transformer": model}, TransformerConfig(),
                    SampleRequest(2, torch.Generator(), TransformerSampler(prompt="ab")))
    assert filled.shape == (2, 24)  # length 0 fills the context
    with pytest.raises(ValueError, match="job.sampling.length 30"):
        sample({"transformer": tiny("learned", context=24)}, TransformerConfig(),
               SampleRequest(1, torch.Generator(), TransformerSampler(prompt="ab", length=30)))


def test_token_samples_are_saved_as_text(tmp_path):
    tokens = torch.tensor([list(b"Tale 1"), list(b"fox\xff!!")])
    text = token_text(tokens, 256)
    assert text == "===== sample 0 =====\nTale 1\n\n===== sample 1 =====\nfox\ufffd!!\n"
    path = save_samples(tokens, tmp_path / "step-00000003.png", DataInfo((6,), kind="tokens", vocab_size=256))
    assert path.name == "step-00000003.txt" and path.read_text(encoding="utf-8") == text
    assert token_text(torch.tensor([[5, 999]]), 1000) == "===== sample 0 =====\n5 999\n"


# -- gradient checkpointing -------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients_and_the_spec_turns_it_on():
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointed in (False, True):
        model = tiny("rotary").train()
        model.enable_grad_checkpointing(checkpointed)
        token_nll(model(tokens), tokens).mean().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12)
    modules = build_modules(JOB, TransformerConfig(layers=1), DataInfo((8,), kind="tokens", vocab_size=256),
                            seed=0, grad_checkpointing=True)
    assert modules["transformer"].grad_checkpointing


# -- config, specs, sizes -----------------------------------------------------------------
def test_config_errors_name_the_field():
    with pytest.raises(SpecError, match="job.config.*heads 5 does not divide d_model 128"):
        load_spec("transformer/debug", ["job.config.heads=5"])
    with pytest.raises(SpecError, match="job.sampling.top_p"):
        load_spec("transformer/debug", ["job.sampling.top_p=1.5"])
    with pytest.raises(ValueError, match="job.config.context 64 is shorter than the data's samples"):
        build(TransformerConfig(context=64), DataInfo((128,), kind="tokens", vocab_size=256))
    with pytest.raises(SpecError, match="eval.metrics: \\['fid'\\] are image sample metrics"):
        load_spec("transformer/debug", ["eval.metrics=[fid]"])
    with pytest.raises(ValueError, match="trains on tokens data"):
        JOB.check_data(DataInfo((1, 8, 8)))


def test_weight_tying_shares_one_parameter():
    tied = DecoderLM(256, 16, 1, 32, 4)
    untied = DecoderLM(256, 16, 1, 32, 4, tie_weights=False)
    assert tied.head.weight is tied.embed.weight
    assert count_parameters(untied) - count_parameters(tied) == 256 * 32


def _parameters_of(name: str, vocab: int) -> int:
    spec = load_spec(name)
    config = JOB.parse_config(spec.job.config, [])
    with torch.device("meta"):  # sizes without allocating the weights
        model = build(config, DataInfo((config.context,), kind="tokens", vocab_size=vocab))["transformer"]
    return count_parameters(model), spec


def test_small_spec_is_about_ten_million_parameters_on_bytes():
    count, spec = _parameters_of("transformer/small", 256)
    assert 9.5e6 < count < 11.5e6
    assert spec.data.source == "builtin:tinytales"  # runs without a packed corpus


def test_gpt2_small_spec_has_gpt2s_124m_parameters_on_its_bpe_vocabulary():
    count, spec = _parameters_of("transformer/gpt2-small", 50257)
    assert count == 124_439_808  # GPT-2 small as released (tied embeddings, learned positions)
    assert spec.train.batch_size * spec.scaling.num_workers * spec.train.grad_accum == 512


def test_1b_spec_is_a_billion_parameters_sharded_by_zero3():
    count, spec = _parameters_of("transformer/gpt-1b", 50257)
    assert 1.0e9 < count < 2.0e9
    assert spec.strategy.name == "deepspeed" and spec.strategy.zero_stage == 3
    assert spec.strategy.grad_checkpointing


def test_bundled_tales_pack_like_a_text_file_the_last_tenth_held_out(tmp_path):
    data = tinytales()
    assert len(data) == 256 * 1024 and data.isascii() and data == tinytales()  # the same on every call
    assert data.startswith(b"Tale 1: ")
    pack_source("tinytales", tmp_path / "tales", per_shard=500, seq_len=64, progress=False)
    index = load_index(str(tmp_path / "tales"))
    chunks = len(data) // 64
    assert (index.kind, index.shape, index.vocab_size) == ("text", (64,), 256)
    assert (index.total("train"), index.total("test")) == (chunks - round(chunks * 0.1), round(chunks * 0.1))
    held_out = torch.cat([batch["tokens"] for batch in eval_batches(index, "test", 100, 0, 1)])
    assert bytes(held_out.flatten().tolist()) == data[index.total("train") * 64:]


# -- it learns ----------------------------------------------------------------------------
def unigram_entropy_bits(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_learns_the_bundled_tales_far_below_their_unigram_entropy(tmp_path):
    steps = 200
    spec = load_spec("transformer/debug", [f"train.steps={steps}", "scaling.num_workers=1",
                                           f"storage_path={tmp_path}", "tracking.enabled=false",
                                           "eval.max_batches=100"])
    engine = Engine(spec, print_fn=None)
    assert engine.data_info == DataInfo((TINYTALES_SEQ_LEN,), kind="tokens", vocab_size=256)
    data = tinytales()
    entropy = unigram_entropy_bits(data[: engine.index.total("train") * TINYTALES_SEQ_LEN])
    start = engine.evaluate()
    batches = engine.train_batches()
    for _ in range(steps):
        engine.optimizer_step(batches)
    end = engine.evaluate()
    print(f"unigram entropy {entropy:.3f} bits/byte; held-out bits/byte {start['eval/bits_per_byte']:.3f} "
          f"-> {end['eval/bits_per_byte']:.3f}, perplexity {end['eval/perplexity']:.3f}")
    assert 4.0 < entropy < 5.0
    assert start["eval/bits_per_byte"] > 7.5  # about log2(256) = 8 at initialisation
    assert end["eval/bits_per_byte"] < 0.6 * entropy
    # the units agree with each other: bits = nats / ln 2, perplexity = exp(mean nats)
    assert end["eval/bits_per_byte"] == pytest.approx(end["eval/nll"] / math.log(2), rel=1e-9)
    assert end["eval/perplexity"] == pytest.approx(math.exp(end["eval/nll"]), rel=1e-9)
    text = token_text(engine.sample(2, seed=0), 256)
    print(text)
    assert text.count("Tale") >= 2  # the prompt, and the model's own use of the word


def test_perplexity_is_inf_past_float_range_not_an_error():
    from gentrain_jobs.transformer.likelihood import perplexity

    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e4) == math.inf
