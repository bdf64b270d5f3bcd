"""Client-side tokenization for the token-id SavedModel, in pure Python (no TensorFlow).

`export_text_classifier` writes two SavedModels. The raw-string one tokenizes
inside the graph and therefore needs the TensorFlow Text kernels in the
server; the token-id one (`<export_dir>/<model_name>_token_ids/<version>`)
contains only core TensorFlow ops and runs on any stock TF Serving binary.
This module produces its three inputs on the client, exactly as training
tokenized (verified id for id against the keras-hub tokenizer on all 872
SST-2 dev sentences in `tests/test_export.py`):

1. Bytes that are not valid UTF-8 are decoded with U+FFFD replacements
   (the serving graph does the same with `tf.strings.unicode_transcode`).
2. CJK ideographs become words of their own.
3. With `strip_accents`: NFD, then combining marks (category Mn) removed.
4. Split on space, control (Cc) and format (Cf) characters, which are
   dropped, and on punctuation (ASCII symbols and category P*) and CJK
   ideographs, which are kept as one-character words. Other Unicode spaces
   (category Zs, e.g. U+00A0) do not split, as in keras-hub's RE2 pattern.
5. With `lowercase`: each word is NFKC-casefolded and default-ignorable code
   points are removed (what `tensorflow_text.case_fold_utf8` does).
6. WordPiece: greedy longest match first with the `##` continuation prefix;
   a word longer than 100 UTF-8 bytes, or one that cannot be covered by the
   vocabulary, becomes a single `[UNK]`.
7. Packing: `[CLS] pieces[:sequence_length - 2] [SEP]`, or for a pair
   `[CLS] a [SEP] b [SEP]` with segment ids 0/1 and the longer side truncated
   first (`tfhub_finetune.data.packing.pack_ids`, the rule training's
   `pack_inputs` uses), padded with the pad id to the longest sequence of
   the batch; `padding_mask` is 1 on real tokens.

Everything it needs is beside the SavedModel: `assets.extra/vocab.txt` and
the `preprocessing` section of `assets.extra/model_card.json`.

Example:

```python
from tfhub_finetune.text_client import TextClient

client = TextClient.from_saved_model("exports/sst2_token_ids/1")
inputs = client.encode(["a gorgeous, witty film", "dull"])
body = client.predict_request(["a gorgeous, witty film"])  # TF Serving REST JSON
# POST body to http://host:8501/v1/models/sst2_token_ids:predict
pairs = client.encode(["A man plays."], ["Someone plays music."])  # pair models
```

The characters classes come from Python's `unicodedata` (Unicode 14 on
Python 3.11); code points assigned after that version may split differently
than in the server's ICU/RE2 tables.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Sequence
from typing import Any

from tfhub_finetune.data.packing import pack_ids

MODEL_CARD = os.path.join("assets.extra", "model_card.json")
VOCAB_FILE = os.path.join("assets.extra", "vocab.txt")
# tensorflow_text.FastWordpieceTokenizer maps longer words to the unknown token.
MAX_BYTES_PER_WORD = 100

# Code points with the Unicode Default_Ignorable_Code_Point property, which
# NFKC_Casefold removes (DerivedCoreProperties.txt).
_DEFAULT_IGNORABLE = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
# The CJK blocks of the original BERT tokenizer (and keras-hub's CJK_REGEX).
_CJK = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)
# ASCII symbols that BERT counts as punctuation although Unicode does not
# (e.g. "$", "^", "`"): the ranges [!-/], [:-@], [[-`], [{-~].
_ASCII_PUNCTUATION = frozenset(
    chr(c) for lo, hi in ((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E))
    for c in range(lo, hi + 1)
)


def _in_ranges(code: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= code <= hi for lo, hi in ranges)


def _is_dropped_delimiter(char: str) -> bool:
    # RE2's `\s` is ASCII-only and \t \n \r \f are Cc; so this is `\s|\p{Cc}|\p{Cf}`.
    return char == " " or unicodedata.category(char) in ("Cc", "Cf")


def _is_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def casefold(text: str) -> str:
    """NFKC_Casefold, as `tensorflow_text.case_fold_utf8` applies it.

    Example:

    ```python
    casefold("Straße\u00ad")  # 'strasse'
    ```
    """
    # NFKC_Casefold(x) = NFKC(casefold(NFKC(x))) minus default ignorables.
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return "".join(c for c in text if not _in_ranges(ord(c), _DEFAULT_IGNORABLE))


class TextClient:
    """Tokenizes and packs texts for the token-id SavedModel, without TensorFlow.

    Args:
        vocabulary: list of str. Word pieces in id order (`vocab.txt`).
        sequence_length: int. Longest packed sequence, [CLS] and [SEP]
            included (the trained length).
        start_id: int. Id of [CLS].
        end_id: int. Id of [SEP].
        pad_id: int. Id used for padding.
        lowercase: bool. NFKC-casefold each word. Defaults to `True`.
        strip_accents: bool. Remove combining marks after NFD. Defaults to
            `False` (keras-hub's BERT tokenizers keep them).
        split: bool. Split on whitespace and punctuation. Defaults to `True`.
        split_on_cjk: bool. Make each CJK ideograph a word. Defaults to `True`.
        suffix_indicator: str. Prefix of continuation pieces. Defaults to
            `"##"`.
        oov_token: str. Piece for words the vocabulary cannot cover. Defaults
            to `"[UNK]"`.

    Example:

    ```python
    client = TextClient(vocab, sequence_length=128, start_id=101, end_id=102, pad_id=0)
    client.tokenize("Hello, world!")  # [7592, 1010, 2088, 999]
    client.encode(["Hello"])["token_ids"]  # [[101, 7592, 102]]
    ```
    """

    def __init__(
        self,
        vocabulary: Sequence[str],
        *,
        sequence_length: int,
        start_id: int,
        end_id: int,
        pad_id: int,
        lowercase: bool = True,
        strip_accents: bool = False,
        split: bool = True,
        split_on_cjk: bool = True,
        suffix_indicator: str = "##",
        oov_token: str = "[UNK]",
    ):
        if sequence_length < 2:
            raise ValueError(
                "Invalid value for argument `sequence_length`. "
                f"Received: sequence_length={sequence_length}. Expected at least 2."
            )
        self.vocabulary = list(vocabulary)
        self._ids = {piece: i for i, piece in enumerate(self.vocabulary)}
        if oov_token not in self._ids:
            raise ValueError(
                f"The vocabulary lacks the unknown token. Received: oov_token={oov_token!r}."
            )
        self.sequence_length = int(sequence_length)
        self.start_id, self.end_id, self.pad_id = int(start_id), int(end_id), int(pad_id)
        self.lowercase = bool(lowercase)
        self.strip_accents = bool(strip_accents)
        self.split = bool(split)
        self.split_on_cjk = bool(split_on_cjk)
        self.suffix_indicator = suffix_indicator
        self.oov_id = self._ids[oov_token]

    @classmethod
    def from_saved_model(cls, path: str | os.PathLike) -> TextClient:
        """Reads `vocab.txt` and the tokenizer settings stored beside an export.

        Args:
            path: str or path. A version folder of either text SavedModel
                (`.../<model_name>_token_ids/<version>` or the raw-string one).

        Returns:
            A `TextClient` that tokenizes exactly as the model was trained.

        Raises:
            FileNotFoundError: if the folder has no model card or vocabulary.
            ValueError: if the export's tokenizer is not one this client
                reproduces (only WordPiece tokenizers from keras-hub are).

        Example:

        ```python
        client = TextClient.from_saved_model("exports/sst2_token_ids/3")
        ```
        """
        card_path = os.path.join(os.fspath(path), MODEL_CARD)
        with open(card_path, encoding="utf-8") as f:
            card = json.load(f)
        pre = card.get("preprocessing", {})
        settings = pre.get("client_tokenizer")
        if not settings:
            raise ValueError(
                "This export's tokenizer cannot be reproduced by text_client. "
                f"Received: path={os.fspath(path)!r}. Send raw strings to the raw-string "
                "SavedModel instead."
            )
        with open(os.path.join(os.fspath(path), VOCAB_FILE), encoding="utf-8") as f:
            # Only the newline is stripped: pieces are kept byte for byte.
            vocabulary = [line[:-1] if line.endswith("\n") else line for line in f]
        return cls(vocabulary, sequence_length=pre["sequence_length"], **settings)

    # === Tokenization ===

    def pretokenize(self, text: str | bytes) -> list[str]:
        """Splits one text into words, as keras-hub's WordPiece tokenizer does.

        Example:

        ```python
        client.pretokenize("Don't panic!")  # ['don', "'", 't', 'panic', '!']
        ```
        """
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if self.strip_accents:
            text = "".join(
                c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn"
            )
        if self.split:
            words, current = [], []
            for char in text:
                keep = _is_punctuation(char) or (self.split_on_cjk and _in_ranges(ord(char), _CJK))
                if keep or _is_dropped_delimiter(char):
                    if current:
                        words.append("".join(current))
                        current = []
                    if keep:
                        words.append(char)
                else:
                    current.append(char)
            if current:
                words.append("".join(current))
        else:
            words = [text]
        if self.lowercase:
            words = [casefold(w) for w in words]
        return words

    def _word_pieces(self, word: str) -> list[int]:
        if not word:
            return []
        if len(word.encode("utf-8")) > MAX_BYTES_PER_WORD:
            return [self.oov_id]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else self.suffix_indicator + word[start:end]
                found = self._ids.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.oov_id]
            pieces.append(found)
            start = end
        return pieces

    def tokenize(self, text: str | bytes) -> list[int]:
        """Word-piece ids of one text, without [CLS]/[SEP] and without truncation.

        Example:

        ```python
        client.tokenize("a gorgeous film")  # [1037, 9882, 2143]
        ```
        """
        return [i for word in self.pretokenize(text) for i in self._word_pieces(word)]

    def encode(
        self,
        texts: Sequence[str | bytes],
        text_pairs: Sequence[str | bytes] | None = None,
    ) -> dict[str, list[list[int]]]:
        """The token-id SavedModel's three inputs for a batch of texts (or pairs).

        Args:
            texts: list of str or bytes.
            text_pairs: list of str or bytes, or None. Second texts, for a
                model trained on pairs (`[CLS] a [SEP] b [SEP]`).

        Returns:
            A dict with `token_ids`, `padding_mask` and `segment_ids`, each a
            list of equal-length int lists (the batch's longest sequence).

        Example:

        ```python
        client.encode(["good", "not good at all"])["padding_mask"]
        # [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
        ```
        """
        if isinstance(texts, (str, bytes)) or isinstance(text_pairs, (str, bytes)):
            raise TypeError("`encode` takes a list of texts; wrap a single text in a list.")
        if text_pairs is not None and len(text_pairs) != len(texts):
            raise ValueError(
                f"`text_pairs` must match `texts`. Received: {len(texts)} texts and "
                f"{len(text_pairs)} text_pairs."
            )
        seconds = [None] * len(texts) if text_pairs is None else text_pairs
        rows = [
            pack_ids(self.tokenize(a), None if b is None else self.tokenize(b),
                     sequence_length=self.sequence_length, start_id=self.start_id,
                     end_id=self.end_id)
            for a, b in zip(texts, seconds, strict=True)
        ]
        width = max((len(ids) for ids, _ in rows), default=2)
        return {
            "token_ids": [ids + [self.pad_id] * (width - len(ids)) for ids, _ in rows],
            "padding_mask": [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows],
            "segment_ids": [segments + [0] * (width - len(segments)) for _, segments in rows],
        }

    def predict_request(
        self,
        texts: Sequence[str | bytes],
        signature_name: str = "serving_default",
        text_pairs: Sequence[str | bytes] | None = None,
    ) -> dict[str, Any]:
        """A TF Serving REST `:predict` body (columnar `inputs` format).

        Example:

        ```python
        requests.post(f"{url}/v1/models/sst2_token_ids:predict",
                      json=client.predict_request(["fine"]))
        ```
        """
        return {"signature_name": signature_name, "inputs": self.encode(texts, text_pairs)}
