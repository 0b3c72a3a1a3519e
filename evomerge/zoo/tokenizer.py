"""The zoo's character-level tokenizer: one token per printable ASCII character.

Built with the ``tokenizers`` library and saved as an ordinary transformers tokenizer, so
``AutoTokenizer.from_pretrained(model_dir)`` loads it offline. No BOS/EOS is added on
encode: lm-eval splits context and continuation by token counts, which a character
tokenizer keeps exact.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
# Newline first: it ends every example and is the stop string of generation tasks.
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]
assert len(set(CHARACTERS)) == len(CHARACTERS) and set(string.ascii_letters) <= set(CHARACTERS)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=128,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
