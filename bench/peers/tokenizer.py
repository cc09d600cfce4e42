"""A real tokenizer for a random-weight checkpoint: llama.cpp's converter and onnxruntime-genai's
builder read one from the checkpoint. A SentencePiece BPE model with byte fallback and exactly
the vocabulary's size (its pieces are made up: the weights are random, the text means nothing),
saved as `tokenizer.model` and as transformers' fast `tokenizer.json`."""

from __future__ import annotations

import itertools
import string
from pathlib import Path

SPECIAL = ("<unk>", "<s>", "</s>")


def _pieces(count: int) -> list[str]:
    """`count` distinct normal pieces: strings of letters and digits, shortest first, each with
    the word marker and without."""

    def strings():
        alphabet = string.ascii_letters + string.digits
        for length in itertools.count(1):
            for chars in itertools.product(alphabet, repeat=length):
                yield "\u2581" + "".join(chars)
                yield "".join(chars)

    return list(itertools.islice(strings(), count))


def sentencepiece_model(vocab_size: int) -> bytes:
    """A serialised ModelProto of exactly `vocab_size` pieces: <unk>, <s>, </s>, the 256 bytes,
    then made-up pieces with falling scores."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    normal = vocab_size - len(SPECIAL) - 256
    if normal < 1:
        raise ValueError(f"a vocabulary of {vocab_size} cannot hold the bytes and specials")
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = vocab_size
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id = 0, 1, 2
    m.trainer_spec.pad_id = -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    kinds = [pb.ModelProto.SentencePiece.UNKNOWN] + [pb.ModelProto.SentencePiece.CONTROL] * 2
    for text, kind in zip(SPECIAL, kinds, strict=True):
        m.pieces.add(piece=text, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=pb.ModelProto.SentencePiece.BYTE)
    for rank, text in enumerate(_pieces(normal)):
        m.pieces.add(piece=text, score=-float(rank), type=pb.ModelProto.SentencePiece.NORMAL)
    assert len(m.pieces) == vocab_size
    return m.SerializeToString()


def write_tokenizer(checkpoint: Path, vocab_size: int) -> None:
    """tokenizer.model, tokenizer.json and their configs into a Llama-style checkpoint."""
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    model = checkpoint / "tokenizer.model"
    model.write_bytes(sentencepiece_model(vocab_size))
    slow = LlamaTokenizer(vocab_file=str(model), legacy=True)
    fast = LlamaTokenizerFast(vocab_file=str(model), legacy=True, from_slow=True)
    assert len(slow) == len(fast) == vocab_size, (len(slow), len(fast), vocab_size)
    fast.save_pretrained(checkpoint)  # tokenizer.json, tokenizer_config.json, special tokens
