"""A LLaMA-layout tokenizer small enough to build in a test: the same ids where OpenVLA relies on them.

Real OpenVLA uses the LLaMA-2 SentencePiece BPE tokenizer: 32000 pieces (<unk>=0, <s>=1, </s>=2,
byte-fallback pieces <0x00>..<0xFF> at 3..258, "▁" at 29871) plus "<PAD>" = 32000 added by
OpenVLA, and the action tokens are simply the last 256 base ids (31744..31999). This builds a
vocabulary with exactly those fixed points: whole-word pieces "▁word" (and every prefix of them, the
merge chain BPE needs) for common English words and the LIBERO / toy instruction words, every
printable ASCII character, byte fallback for anything else, and inert fillers (single private-use
characters) up to 32000. It is written both as tokenizer.json (tokenizers' BPE with the LLaMA-2
normalizer: prepend "▁", spaces -> "▁") and as a real SentencePiece tokenizer.model (a BPE
ModelProto assembled with the `sentencepiece` package's protobuf schema; merge priority = piece
score), which encode identically (tests check it).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

BASE_VOCAB = 32000
SPACE_ID = 29871  # "▁"
PAD = "<PAD>"
SPECIALS = ("<unk>", "<s>", "</s>")

WORDS = """
in what action should the robot take to out a an and or of on at by for from with into onto over under up down
left right front back top bottom middle center centre near next between inside outside behind above below
pick place put push pull open close turn move lift drop grasp grab hold rotate slide stack insert remove
reach go get set make it its this that them both all each one two three then again
bowl plate ramekin cookie box wooden cabinet drawer stove wine bottle rack basket alphabet soup tomato
sauce butter milk orange juice ketchup salad dressing bbq barbecue chocolate pudding cream cheese moka pot
pots frying pan mug cup book caddy compartment microwave shelf flat sink faucet table kitchen living room
study scene floor counter tray bin lid door handle knob block object cube ball toy
black white red green blue yellow purple cyan brown gray grey pink
small large big little empty full
""".split()


def _pieces() -> list[str]:
    """Every "▁word" and its prefixes (length >= 2), short first: BPE merges build words from them."""
    found = set()
    for word in WORDS:
        for variant in {word, word.capitalize()}:
            piece = "▁" + variant
            found.update(piece[:n] for n in range(2, len(piece) + 1))
    return sorted(found, key=lambda p: (len(p), p))


def vocabulary() -> list[str]:
    """The 32000 base pieces in id order."""
    vocab = list(SPECIALS) + [f"<0x{b:02X}>" for b in range(256)]
    vocab += _pieces()
    chars = [c for c in string.printable if not c.isspace()]
    fill = 0

    def filler() -> str:
        nonlocal fill
        fill += 1
        return chr(0xF0000 + fill)  # supplementary private use: never in instructions

    while len(vocab) < SPACE_ID:
        vocab.append(filler())
    vocab += ["▁"] + chars
    while len(vocab) < BASE_VOCAB:
        vocab.append(filler())
    assert len(vocab) == BASE_VOCAB and vocab[SPACE_ID] == "▁" and len(set(vocab)) == BASE_VOCAB
    return vocab


def merges(vocab: list[str]) -> list[tuple[str, str]]:
    """BPE merges in priority order: each multi-character piece from its prefix and last character."""
    return [(p[:-1], p[-1]) for p in vocab[3 + 256:SPACE_ID] if len(p) > 1]


def write_tokenizer_json(path: Path, vocab: list[str]) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab={p: i for i, p in enumerate(vocab)}, merges=merges(vocab), unk_token="<unk>",
                        fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (*SPECIALS, PAD)])
    tok.save(str(path))


def write_sentencepiece_model(path: Path, vocab: list[str]) -> None:
    """tokenizer.model: a SentencePiece BPE ModelProto with LLaMA-2's settings and this vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = BASE_VOCAB
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    types = {"<unk>": pb.ModelProto.SentencePiece.UNKNOWN, "<s>": pb.ModelProto.SentencePiece.CONTROL,
             "</s>": pb.ModelProto.SentencePiece.CONTROL}
    for i, piece in enumerate(vocab):
        sp = m.pieces.add()
        sp.piece = piece
        if piece in types:
            sp.type, sp.score = types[piece], 0.0
        elif 3 <= i < 259:
            sp.type, sp.score = pb.ModelProto.SentencePiece.BYTE, 0.0
        else:
            sp.type, sp.score = pb.ModelProto.SentencePiece.NORMAL, float(-(i - 259))  # earlier = merged first
    path.write_bytes(m.SerializeToString())


def tokenizer_config() -> dict:
    """tokenizer_config.json in the shape of openvla-7b's (LLaMA tokenizer, <PAD> = 32000)."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (BASE_VOCAB, PAD)]}
    return {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
            "auto_map": {"AutoProcessor": "processing_prismatic.PrismaticProcessor"},
            "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False,
            "model_max_length": 2048, "pad_token": PAD, "padding_side": "right",
            "processor_class": "PrismaticProcessor", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>", "use_default_system_prompt": False}


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json, tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json."""
    vocab = vocabulary()
    write_tokenizer_json(folder / "tokenizer.json", vocab)
    write_sentencepiece_model(folder / "tokenizer.model", vocab)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    special = {name: {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
               for name, t in [("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")]}
    special["pad_token"] = PAD
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (folder / "added_tokens.json").write_text(json.dumps({PAD: BASE_VOCAB}, indent=2) + "\n")
