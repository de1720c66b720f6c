"""Byte-level BPE packs: learning, encode/decode, the pack -> read round trip, and the
transformer's bits per byte over BPE tokens."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from gentrain.data.bpe import (BYTE_TOKENS, Bpe, BpeError, gpt2_byte_alphabet, learn_merges, pretokens,
                               read_gpt2_merges, read_merges)
from gentrain.data.index import load_index
from gentrain.data.pack import pack_source
from gentrain.data.packable import split_text_bytes
from gentrain.data.pipeline import eval_batches
from gentrain.registry import DataInfo
from gentrain.visual import save_samples, token_text
from gentrain_jobs.transformer import TransformerConfig, TransformerSampler, evaluate, prompt_tokens, summarize
from gentrain_jobs.transformer.likelihood import bpe_bits_per_byte, token_nll

# Pieces that stress UTF-8 and the pre-tokeniser: multi-byte letters, CJK, combining marks,
# emoji (with skin tone and zero-width-joiner sequences), digits, punctuation, underscores,
# contractions and runs of every kind of whitespace.
PIECES = ["a", "b", "the", " cat", "é", "ß", "Ωmega", "中文", "ह\u093f", "e\u0301", "😀", "👍🏽", "👩\u200d💻",
          "42", "3.14", "_", "__init__", "'s", "'ll", "don't", "!?", "...", "—", " ", "  ", "   ", "\t", "\n",
          "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "x", "yy", "zzz", "Ä", "ö"]


def random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(pieces))


def naive_merges(text: str, vocab_size: int) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """The definition, recomputed from scratch at every step: every pre-token occurrence, all
    pairs recounted, the most frequent taken (ties: smallest pair). Returns the merges and the
    final segmentation of each pre-token occurrence."""
    words = [list(piece.encode("utf-8")) for piece in pretokens(text)]
    merges = []
    while len(merges) < vocab_size - BYTE_TOKENS:
        counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        new = BYTE_TOKENS + len(merges)
        merges.append(pair)
        merged_words = []
        for word in words:
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged_words.append(out)
        words = merged_words
    return merges, words


# -- learning ---------------------------------------------------------------------------
def test_merges_on_a_hand_made_text_equal_the_hand_computed_ones():
    # Pre-tokens "ab", " ab" x2, " abc". Pairs: (a,b) 4, (' ',a) 3, (b,c) 1 -> merge a+b = 256;
    # then (' ',256) 3, (256,c) 1 -> ' '+256 = 257; then (257,c) 1 -> 258; then no pair is left.
    bpe = learn_merges("ab ab ab abc", 300)
    a, b, c, space = map(ord, "abc ")
    assert bpe.merges == [(a, b), (space, 256), (257, c)]
    assert bpe.vocab_size == 259
    assert [bpe.token_bytes(t) for t in (256, 257, 258)] == [b"ab", b" ab", b" abc"]
    assert bpe.encode("ab ab abc ba") == [256, 257, 258, space, b, a]


def test_ties_go_to_the_smallest_pair_whatever_the_text_order():
    # Every pair occurs once. (' ',b) < (' ',d) < (b,a) < (d,c) by ids: merge (' ',b) -> 256,
    # then the smallest of (' ',d), (d,c), (256,a) is (' ',d) -> 257, then (256,a), (257,c).
    space, a, b, c, d = map(ord, " abcd")
    expected = [(space, b), (space, d), (256, a), (257, c)]
    assert learn_merges("x ba dc", 300).merges == expected
    assert learn_merges("x dc ba", 300).merges == expected  # same pre-tokens, other order
    assert learn_merges("x ba dc", 258).merges == expected[:2]  # the vocabulary size stops it


def test_vocab_size_below_one_merge_is_refused_naming_the_flag():
    with pytest.raises(BpeError, match="--bpe-vocab 256"):
        learn_merges("abc", 256)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_learning_equals_the_from_scratch_definition(seed):
    text = random_text(random.Random(seed), 400)
    merges, words = naive_merges(text, 330)
    bpe = learn_merges(text, 330)
    assert bpe.merges == merges
    # encoding applies merges in learnt order: the learnt segmentation of every pre-token
    assert [bpe.encode_piece(piece.encode("utf-8")) for piece in pretokens(text)] == words


# -- encode / decode --------------------------------------------------------------------
def test_pretokens_split_words_spaces_and_punctuation_and_join_back():
    # a whitespace run gives its last character to the word that follows when that is a
    # space (" It"); a newline cannot lead a word, so it stands alone ("\n", "\n", "ok")
    assert pretokens("Hello, world!  It's 2026\n\nok") == [
        "Hello", ",", " world", "!", " ", " It", "'s", " 2026", "\n", "\n", "ok"]
    assert pretokens("a  \n  b") == ["a", "  \n ", " b"]


def test_encode_then_decode_is_the_original_text_for_arbitrary_utf8():
    rng = random.Random(0)
    bpe = learn_merges(random_text(rng, 3000), 400)
    assert any(len(bpe.token_bytes(t).decode("utf-8", errors="ignore")) < len(bpe.token_bytes(t))
               for t in range(BYTE_TOKENS, bpe.vocab_size))  # some tokens hold part of a character
    other = learn_merges("the cat sat on the mat. " * 20, 300)  # merges that never saw these characters
    for _ in range(300):
        text = random_text(rng, rng.randrange(0, 40))
        # and arbitrary code points (no lone surrogates: those are not UTF-8)
        text += "".join(chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x110000)]))
                        for _ in range(rng.randrange(0, 5)))
        assert "".join(pretokens(text)) == text
        for model in (bpe, other):
            tokens = model.encode(text)
            assert all(0 <= t < model.vocab_size for t in tokens)
            assert model.decode(tokens) == text
            assert sum(model.token_lengths()[tokens]) == len(text.encode("utf-8"))


# -- GPT-2 merges files -----------------------------------------------------------------
def test_gpt2_byte_alphabet_is_a_bijection_with_gpt2s_space_and_newline_symbols():
    alphabet = gpt2_byte_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n") and alphabet["a"] == ord("a")


def test_a_hand_made_gpt2_merges_file_reads_into_the_same_segmentation(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nĠt h\nh e\n", encoding="utf-8")
    symbols = {symbol: byte for symbol, byte in gpt2_byte_alphabet().items()}
    vocab = {symbol: byte for symbol, byte in symbols.items()}
    vocab.update({"Ġt": 256, "Ġth": 257, "he": 258})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    bpe = read_merges(tmp_path / "merges.txt")
    space, t, h, e = map(ord, " the")
    assert bpe.merges == [(space, t), (256, h), (h, e)]
    # " the": ' '+t first (rank 0), then 256+h (rank 1, before h+e): [" th", "e"]
    assert [bpe.token_bytes(tok) for tok in bpe.encode(" the")] == [b" th", b"e"]
    _, mapping = read_gpt2_merges(tmp_path / "merges.txt", tmp_path / "vocab.json")
    assert mapping[256] == 256 and mapping[ord("a")] == ord("a")


def test_a_merges_file_in_no_known_format_is_refused(tmp_path):
    (tmp_path / "m.txt").write_text("hello\n", encoding="utf-8")
    with pytest.raises(BpeError, match="#gentrain-bpe 1"):
        read_merges(tmp_path / "m.txt")
    with pytest.raises(BpeError, match="--bpe-merges"):
        read_merges(tmp_path / "missing.txt")


# -- packing ----------------------------------------------------------------------------
def test_pack_then_read_gives_the_same_tokens_and_byte_counts(tmp_path):
    text = random_text(random.Random(1), 4000)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    seq_len = 16
    index_json = pack_source(str(tmp_path / "corpus.txt"), tmp_path / "pack", per_shard=7, seq_len=seq_len,
                             test_fraction=0.2, bpe_vocab=320, progress=False)
    train_text, test_text = (part.decode("utf-8") for part in split_text_bytes(text.encode("utf-8"), 0.2))
    assert train_text + test_text == text
    bpe = learn_merges(train_text, 320)  # learnt on the train split only
    assert (tmp_path / "pack" / "merges.txt").read_text() == bpe.merges_text()
    assert index_json["dtype"] == "uint16" and index_json["vocab_size"] == bpe.vocab_size == 320
    index = load_index(tmp_path / "pack")
    assert index.merges == tuple(bpe.merges) and index.dtype == "uint16"
    assert DataInfo.of_index(index).merges == tuple(bpe.merges)
    lengths = bpe.token_lengths()
    for split, part in (("train", train_text), ("test", test_text)):
        expected = np.array(bpe.encode(part))
        count = len(expected) // seq_len
        expected = expected[: count * seq_len].reshape(count, seq_len)
        batches = list(eval_batches(index, split, 5, 0, 1))
        tokens = torch.cat([batch["tokens"] for batch in batches])
        assert tokens.dtype == torch.int64 and index.total(split) == count
        assert np.array_equal(tokens.numpy(), expected)
        assert torch.cat([batch["bytes"] for batch in batches]).tolist() == lengths[expected].sum(1).tolist()
        assert torch.cat([batch["first_bytes"] for batch in batches]).tolist() == lengths[expected[:, 0]].tolist()
        assert part.encode("utf-8").startswith(bpe.decode_bytes(tokens.flatten().tolist()))
        assert index_json["text_bytes"][split] == int(lengths[expected].sum())


def test_reused_merges_give_the_same_pack_and_other_vocabularies_another_hash(tmp_path):
    text = random_text(random.Random(2), 2000)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    source = str(tmp_path / "corpus.txt")
    first = pack_source(source, tmp_path / "a", seq_len=8, bpe_vocab=300, progress=False)
    again = pack_source(source, tmp_path / "b", seq_len=8, bpe_merges=tmp_path / "a" / "merges.txt", progress=False)
    other = pack_source(source, tmp_path / "c", seq_len=8, bpe_vocab=301, progress=False)
    plain = pack_source(source, tmp_path / "d", seq_len=8, progress=False)
    assert again["content_hash"] == first["content_hash"]
    assert again["tokenizer"] == first["tokenizer"]
    assert len({first["content_hash"], other["content_hash"], plain["content_hash"]}) == 3
    assert plain["dtype"] == "uint8" and "tokenizer" not in plain
    # a merges file edited after packing is caught when the index is read
    (tmp_path / "a" / "merges.txt").write_text((tmp_path / "c" / "merges.txt").read_text())
    with pytest.raises(ValueError, match="merges_sha256"):
        load_index(tmp_path / "a")


def test_token_shards_decode_little_endian_16_and_32_bit_ids():
    from gentrain.data.reader import decode_sample

    ids = [0, 255, 256, 65535]
    sample = {"tokens": np.array(ids, dtype="<u2").tobytes()}
    assert decode_sample(sample, (4,), "uint16").tolist() == ids
    big = ids + [65536, 2**31 + 5]
    decoded = decode_sample({"tokens": np.array(big, dtype="<u4").tobytes()}, (6,), "uint32")
    assert decoded.dtype == torch.int64 and decoded.tolist() == big
    with pytest.raises(ValueError, match="index says"):
        decode_sample(sample, (8,), "uint16")  # 4 ids where the index promised 8


def test_bpe_flags_are_refused_for_non_text_sources():
    with pytest.raises(ValueError, match="--bpe-vocab"):
        pack_source("digits", "/nonexistent-never-written", bpe_vocab=300, progress=False)


# -- samples ----------------------------------------------------------------------------
def test_token_samples_and_prompts_decode_and_encode_with_the_merges(tmp_path):
    bpe = learn_merges("Tale 1: the fox. Tale 2: the owl. ", 280)
    info = DataInfo((8,), kind="tokens", vocab_size=bpe.vocab_size, merges=tuple(bpe.merges))
    assert DataInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    tokens = torch.tensor([bpe.encode("Tale 2: the fox.")])
    assert token_text(tokens, info.vocab_size, info.merges) == "===== sample 0 =====\nTale 2: the fox.\n"
    path = save_samples(tokens, tmp_path / "step-00000100.png", info)  # what training and `gentrain sample` call
    assert path.name == "step-00000100.txt" and path.read_text(encoding="utf-8").endswith("Tale 2: the fox.\n")
    prompt = prompt_tokens(TransformerSampler(prompt="Tale 1: "), bpe.vocab_size, bpe.merges)
    assert prompt == bpe.encode("Tale 1: ") and len(prompt) < len("Tale 1: ")


# -- bits per byte ----------------------------------------------------------------------
class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits, self.vocab_size = logits, logits.shape[-1]

    def forward(self, tokens):
        return self.logits


def logits_giving(targets: list[list[int]], probabilities: list[list[float]], vocab: int) -> torch.Tensor:
    """Logits [B, T, V] under which each target token has the given probability: the target's
    logit ln(p (V - 1) / (1 - p)) against V - 1 zeros."""
    logits = torch.zeros(len(targets), len(targets[0]) + 1, vocab, dtype=torch.float64)
    for row, (target_row, p_row) in enumerate(zip(targets, probabilities)):
        for position, (target, p) in enumerate(zip(target_row, p_row)):
            logits[row, position, target] = math.log(p * (vocab - 1) / (1 - p))
    return logits


def test_bits_per_byte_over_bpe_tokens_is_total_bits_over_predicted_bytes():
    vocab = 300
    # Batch A, one sample [5, 260, 270]: predictions with p 1/4 and 1/2 -> 2 + 1 = 3 bits; the
    # sample covers 10 bytes, its first token 4 (context only) -> 6 predicted bytes.
    # Batch B, two samples, every prediction p 1/2 -> 2 bits each; bytes 5 - 1 and 9 - 3.
    # Bits per byte = (3 + 2 + 2) / (6 + 4 + 6) = 7 / 16; nll per token = 7 ln 2 / 6.
    batch_a = {"tokens": torch.tensor([[5, 260, 270]]), "bytes": torch.tensor([10]),
               "first_bytes": torch.tensor([4])}
    logits_a = logits_giving([[260, 270]], [[0.25, 0.5]], vocab)
    batch_b = {"tokens": torch.tensor([[1, 2, 3], [4, 280, 6]]), "bytes": torch.tensor([5, 9]),
               "first_bytes": torch.tensor([1, 3])}
    logits_b = logits_giving([[2, 3], [280, 6]], [[0.5, 0.5], [0.5, 0.5]], vocab)
    torch.testing.assert_close(token_nll(logits_a, batch_a["tokens"]),
                               torch.tensor([[math.log(4), math.log(2)]], dtype=torch.float32))
    assert bpe_bits_per_byte(token_nll(logits_a, batch_a["tokens"]), batch_a) == pytest.approx(3 / 6)
    # what the platform does (evaluation/training.py): per-batch values weighted by batch size
    sums, count = Counter(), 0
    for logits, batch in ((logits_a, batch_a), (logits_b, batch_b)):
        metrics = evaluate({"transformer": FixedLogits(logits)}, TransformerConfig(), batch, None)
        assert "bits_per_byte" not in metrics  # a ratio of sums: only the whole set gives it
        size = len(batch["tokens"])
        for key, value in metrics.items():
            sums[key] += value * size
        count += size
    means = {key: value / count for key, value in sums.items()}
    means.update(summarize(means))
    assert means["bits_per_byte"] == pytest.approx(7 / 16, rel=1e-6)  # float32 logits
    assert means["nll"] == pytest.approx(7 * math.log(2) / 6, rel=1e-6)
    assert means["perplexity"] == pytest.approx(2 ** (7 / 6), rel=1e-6)


# -- it learns ----------------------------------------------------------------------------
def test_learns_the_bundled_tales_over_bpe_below_their_unigram_byte_entropy(tmp_path):
    from gentrain.data.texts import tinytales
    from gentrain.engine import Engine
    from gentrain.validation import load_spec

    pack_source("tinytales", tmp_path / "tales", seq_len=48, per_shard=128, bpe_vocab=512, progress=False)
    steps = 40
    spec = load_spec("transformer/debug", [f"data.source={tmp_path / 'tales'}", f"train.steps={steps}",
                                           "scaling.num_workers=1", f"storage_path={tmp_path}",
                                           "tracking.enabled=false", "eval.max_batches=10"])
    engine = Engine(spec, print_fn=None)
    assert engine.data_info.vocab_size == 512 and len(engine.data_info.merges) == 256
    counts = np.bincount(np.frombuffer(tinytales(), np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    start = engine.evaluate()
    batches = engine.train_batches()
    for _ in range(steps):
        engine.optimizer_step(batches)
    end = engine.evaluate()
    print(f"unigram entropy {entropy:.3f} bits/byte; held-out bits/byte {start['eval/bits_per_byte']:.3f} -> "
          f"{end['eval/bits_per_byte']:.3f}, perplexity per token {end['eval/perplexity']:.2f}")
    # at initialisation about log2(512) = 9 bits per token, over the ~3 bytes a token holds
    assert start["eval/bits_per_byte"] > 2.0
    assert end["eval/bits_per_byte"] < 0.6 * entropy  # 150 steps reach 0.33 bits/byte
    assert end["eval/perplexity"] == pytest.approx(math.exp(end["eval/nll"]), rel=1e-9)


def test_the_cli_flags_learn_then_reuse_merges(tmp_path, capsys):
    from gentrain.cli import main

    (tmp_path / "a.txt").write_text("the fox and the owl. " * 40, encoding="utf-8")
    (tmp_path / "b.txt").write_text("the owl and the fox! " * 40, encoding="utf-8")
    assert main(["data", "pack", str(tmp_path / "a.txt"), "--out", str(tmp_path / "a"), "--seq-len", "8",
                 "--bpe-vocab", "264"]) == 0
    assert main(["data", "pack", str(tmp_path / "b.txt"), "--out", str(tmp_path / "b"), "--seq-len", "8",
                 "--bpe-merges", str(tmp_path / "a" / "merges.txt")]) == 0
    a, b = load_index(tmp_path / "a"), load_index(tmp_path / "b")
    assert a.vocab_size == b.vocab_size == 264 and a.merges == b.merges
    with pytest.raises(SystemExit):  # one or the other
        main(["data", "pack", str(tmp_path / "a.txt"), "--out", str(tmp_path / "c"), "--bpe-vocab", "300",
              "--bpe-merges", str(tmp_path / "a" / "merges.txt")])
    assert "not allowed with argument" in capsys.readouterr().err
